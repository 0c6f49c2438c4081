"""Cases found by file names instead of a datalist: subject folders, and plain folders of NIfTI files.

Subject folders: ``data.root`` holds one folder per case, and glob patterns relative to it say which file is the
image and which the label (``*/img.nii.gz``, ``*/label.nii.gz``; one image pattern per channel). The folders
matched by the patterns' wildcards name the case (``*/*/img.nii.gz`` under ``site_a/subj_001`` -> ``site_a`` and
``subj_001``; ``**`` matches any number of folders); a pattern whose folders are all fixed names the case by its
file name's wildcard instead (``imagesTr/*_0000.nii.gz`` -> ``case``). A case folder with a missing file, or
with several files where the pattern expects one, is reported rather than guessed at.

Plain folders: nnU-Net's ``{case}_{channel:04d}`` file names group into one case per name with one file per
channel, when every file follows that naming consistently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglight.core.errors import ConfigError, DataError
from seglight.core.io import is_nifti
from seglight.data.datalists import IMAGE, LABEL, Case, assign_case_ids
from seglight.data.remote import RemoteCache, is_remote, join_path

DEFAULT_IMAGE_PATTERN = "*/img.nii.gz"
DEFAULT_LABEL_PATTERN = "*/label.nii.gz"
_NNUNET_NAME = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})\.nii(?:\.gz)?")


@dataclass(frozen=True)
class CasePattern:
    """A glob pattern relative to the root, compiled: which files it matches and to which case each belongs."""

    text: str
    option: str
    regex: re.Pattern[str]
    kinds: tuple[
        str, ...
    ]  # per regex group: "folder", "deep" (a ``**`` run) or "file" (a wildcard in the name)
    by_folder: bool  # cases are named by folders (else by the wildcard part of the file name)
    depth: int | None  # path parts of a match; None with ``**``

    def match(self, relative: str) -> tuple[tuple[str, ...], str] | None:
        """(the parts naming the case, the case's folder or file relative to the root), or None."""
        found = self.regex.fullmatch(relative)
        if found is None:
            return None
        parts: list[str] = []
        end = 0
        for number, kind in enumerate(self.kinds, start=1):
            value = found.group(number) or ""
            if kind == "folder" and self.by_folder:
                parts.append(value)
                end = found.end(number)
            elif kind == "deep" and self.by_folder:
                parts.extend(p for p in value.split("/") if p)
                end = max(end, found.end(number))
        if not self.by_folder:
            name = "".join(found.group(n) or "" for n, k in enumerate(self.kinds, start=1) if k == "file")
            return (name,), relative
        return tuple(parts), relative[:end].rstrip("/")


def compile_pattern(text: str, option: str) -> CasePattern:
    """A ``CasePattern`` for ``text`` (``*``, ``?``, ``[...]`` within a name, ``**`` for any folders)."""
    pattern = str(text).strip()
    if not pattern or pattern.startswith("/") or "://" in pattern or "\\" in pattern:
        raise ConfigError(
            f"{option}={text!r}: must be a glob relative to data.root with / between folders, e.g. "
            f"'{DEFAULT_IMAGE_PATTERN}'"
        )
    segments = pattern.split("/")
    if any(s in ("", ".", "..") for s in segments) or segments.count("**") > 1 or segments[-1] == "**":
        raise ConfigError(
            f"{option}={text!r}: each part between slashes must be a name or a glob below data.root "
            "(at most one '**', and a file name last)"
        )
    regex, kinds = "", []
    for segment in segments[:-1]:
        if segment == "**":
            regex += r"((?:[^/.][^/]*/)*)"  # any number of folders, hidden ones excepted
            kinds.append("deep")
        elif _has_wildcard(segment):
            regex += f"({_translate(segment, capture=False)})/"
            kinds.append("folder")
        else:
            regex += re.escape(segment) + "/"
    file_regex, captures = _translate_name(segments[-1])
    regex += file_regex
    kinds += ["file"] * captures
    by_folder = any(k in ("folder", "deep") for k in kinds)
    if not by_folder and not captures:
        raise ConfigError(
            f"{option}={text!r}: has no wildcard, so it names one file, not one per case; "
            f"use e.g. '{DEFAULT_IMAGE_PATTERN}'"
        )
    depth = None if "deep" in kinds else len(segments)
    return CasePattern(pattern, option, re.compile(regex), tuple(kinds), by_folder, depth)


@dataclass
class IncompleteCase:
    """A case folder that cannot be used as it is, and why (each problem names what is missing or extra)."""

    case_id: str
    where: str
    problems: list[str] = field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per problem, each starting with the folder (or file) it concerns."""
        return [f"{self.where}: {problem}" for problem in self.problems]


@dataclass
class FolderCases:
    """What a subject-folder root holds: complete cases, and the case folders that are not."""

    cases: list[Case]
    incomplete: list[IncompleteCase]


def read_folder_cases(
    root: str | Path,
    image_pattern: str | Sequence[str] = DEFAULT_IMAGE_PATTERN,
    label_pattern: str | None = DEFAULT_LABEL_PATTERN,
    store: RemoteCache | None = None,
    require_label: bool = True,
    prefix: str = "data.",
    allow_empty: bool = False,
) -> FolderCases:
    """The cases of a folder (or ``s3://`` prefix) of subject folders, found by glob patterns.

    Args:
        root: the folder holding the case folders.
        image_pattern: glob of a case's image relative to ``root``; a list gives one pattern per channel.
        label_pattern: glob of a case's label; ``None`` looks for no labels (prediction).
        require_label: a case without a label is incomplete (training); otherwise its label is optional.
        prefix: how the options are spelled in messages (``data.`` for training).
        allow_empty: nothing matching the image pattern gives no cases instead of a DataError.
    """
    store = store or RemoteCache()
    texts = [image_pattern] if isinstance(image_pattern, str) else list(image_pattern)
    many = len(texts) > 1  # one file per channel, stacked
    if not texts:
        raise ConfigError(f"{prefix}image_pattern: give at least one pattern")
    images = [
        compile_pattern(t, f"{prefix}image_pattern" + (f"[{c}]" if many else "")) for c, t in enumerate(texts)
    ]
    label = compile_pattern(label_pattern, f"{prefix}label_pattern") if label_pattern else None
    patterns = [*images, *([label] if label else [])]
    if len({p.by_folder for p in patterns}) > 1:
        raise ConfigError(
            f"{prefix}image_pattern and {prefix}label_pattern must both name cases by folder (a wildcard folder) "
            f"or both by file name, got {', '.join(repr(p.text) for p in patterns)}"
        )
    levels = {p.kinds.count("folder") for p in patterns if "deep" not in p.kinds}
    if len(levels) > 1:
        raise ConfigError(
            f"{prefix}image_pattern and {prefix}label_pattern must have the same number of wildcard folders, "
            f"which name the case ({', '.join(repr(p.text) for p in patterns)})"
        )
    if not is_remote(root) and not Path(root).expanduser().is_dir():
        raise DataError(f"{prefix}root {root}: no such folder")
    depths = [p.depth for p in patterns]
    files = store.find(root, max_depth=None if None in depths else max(d for d in depths if d is not None))
    matches: list[dict[tuple[str, ...], list[str]]] = [{} for _ in patterns]
    wheres: dict[tuple[str, ...], str] = {}
    for relative in files:
        for slot, pattern in enumerate(patterns):
            found = pattern.match(relative)
            if found is not None:
                key, where = found
                matches[slot].setdefault(key, []).append(relative)
                wheres.setdefault(key, where)
    if not any(matches[: len(images)]):
        if allow_empty:
            return FolderCases([], [])
        # Say what the root does hold, deeper down too, so that the pattern can be fixed from the message.
        raise DataError(_nothing_matches(root, images[0], store.find(root, limit=1000)))
    keys = sorted(wheres)
    entries: list[Case] = []
    problems: list[list[str]] = []
    for key in keys:
        issues: list[str] = []
        found_images = [
            _one(matches[c].get(key, []), pattern, _channel_name(c, many), issues, required=True)
            for c, pattern in enumerate(images)
        ]
        entry: Case = {}
        if all(found_images):
            paths = [join_path(root, f) for f in found_images if f]
            entry[IMAGE] = paths if many else paths[0]
        if label is not None:
            found_label = _one(matches[-1].get(key, []), label, "label", issues, required=require_label)
            if found_label:
                entry[LABEL] = join_path(root, found_label)
        entries.append(entry)
        problems.append(issues)
    # Ids come from the folders (or the file names' wildcard part), never from file names alike in every case.
    assign_case_ids(entries, f"{prefix}root={root}", name_parts=keys)
    cases, incomplete = [], []
    for key, entry, issues in zip(keys, entries, problems, strict=True):
        if issues:
            where = join_path(root, wheres[key])
            if not patterns[0].by_folder:
                issues = [f"{i} for case {entry['case_id']!r}" for i in issues]
            incomplete.append(IncompleteCase(entry["case_id"], where, issues))
        else:
            cases.append(entry)
    return FolderCases(cases, incomplete)


def group_channel_files(files: Sequence[str], channels: int | None = None) -> list[tuple[str, Any]] | None:
    """nnU-Net-named files (``case_0000.nii.gz``, ``case_0001.nii.gz``) as ``(case, file or channel files)``.

    Only when every file is named so, every case has the channels 0000, 0001, ... without a gap and all the
    same number of them (``channels`` when the model's is known); otherwise None, and each file is a case.
    """
    groups: dict[str, dict[int, str]] = {}
    for path in files:
        found = _NNUNET_NAME.fullmatch(str(path).rstrip("/").rsplit("/", 1)[-1])
        if found is None:
            return None
        groups.setdefault(found["case"], {})[int(found["channel"])] = str(path)
    counts = {len(g) for g in groups.values()}
    if len(counts) != 1:
        return None
    count = counts.pop()
    if (channels is not None and count != channels) or any(
        sorted(g) != list(range(count)) for g in groups.values()
    ):
        return None
    return [
        (case, g[0] if count == 1 else [g[c] for c in range(count)]) for case, g in sorted(groups.items())
    ]


def _one(found: list[str], pattern: CasePattern, what: str, issues: list[str], required: bool) -> str | None:
    """The single file of a case that ``pattern`` found, or None with the problem added to ``issues``."""
    if len(found) == 1:
        return found[0]
    if not found:
        if required:
            issues.append(f"has no {what} (nothing matches {pattern.option}={pattern.text!r})")
        return None
    names = ", ".join(f.rsplit("/", 1)[-1] for f in found[:4]) + (", ..." if len(found) > 4 else "")
    issues.append(
        f"{len(found)} files match {pattern.option}={pattern.text!r} ({names}); a case needs exactly one {what}"
    )
    return None


def _channel_name(channel: int, many: bool) -> str:
    return f"image for channel {channel}" if many else "image"


def _nothing_matches(root: str | Path, pattern: CasePattern, files: list[str]) -> str:
    nifti = [f for f in files if is_nifti(f)]
    if nifti:
        seen = ", ".join(nifti[:3]) + (", ..." if len(nifti) > 3 else "")
        hint = f"it holds e.g. {seen}; set {pattern.option} to match one image per case"
    elif files:
        hint = "it holds no .nii or .nii.gz files"
    else:
        hint = "it is empty" if not is_remote(root) else "nothing is stored under it"
    return f"{pattern.option.rsplit('image_pattern', 1)[0]}root={root}: no file matches {pattern.option}={pattern.text!r} ({hint})"


def _has_wildcard(segment: str) -> bool:
    return any(c in segment for c in "*?[")


def _translate(segment: str, capture: bool) -> str:
    """A glob of one path part as a regex: ``*`` and ``?`` stay within the part and never match a leading dot."""
    regex, _ = _translate_parts(segment, capture)
    return regex


def _translate_name(segment: str) -> tuple[str, int]:
    return _translate_parts(segment, capture=True)


def _translate_parts(segment: str, capture: bool) -> tuple[str, int]:
    out, captures, i = "", 0, 0
    if segment[:1] in ("*", "?", "["):
        out += r"(?!\.)"  # as the shell: a wildcard does not match hidden files
    while i < len(segment):
        char = segment[i]
        if char == "*":
            while i + 1 < len(segment) and segment[i + 1] == "*":
                i += 1
            piece = r"[^/]*"
        elif char == "?":
            piece = r"[^/]"
        elif char == "[" and "]" in segment[i + 2 :]:
            end = segment.index("]", i + 2)  # "[]...]" holds a literal "]"
            body = segment[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            piece = "[" + body.replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(char)
            i += 1
            continue
        if capture:
            piece = f"({piece})"
            captures += 1
        out += piece
        i += 1
    return out, captures
