"""Dataset layouts -> a list of cases, each a dict of image and label paths.

Three layouts are read, from a local folder or an ``s3://`` prefix alike:

- MSD: ``dataset.json`` with a ``"training"`` list of ``{"image": ..., "label": ...}`` entries;
- nnU-Net v2 raw: ``imagesTr/{case}_{channel:04d}{file_ending}``, ``labelsTr/{case}{file_ending}`` and a
  ``dataset.json`` with ``channel_names``, ``labels``, ``numTraining`` and ``file_ending``;
- a datalist file: CSV with a header row, or JSON (a list of entries, or ``{"training": [...]}``).

A case's image may be a list of files, one per channel (several modalities); they are stacked as channels.
Subject folders without a datalist are read by ``seglight.data.folders``; which of these a path holds,
``seglight.data.layouts`` tells. Every reader names its cases with ``assign_case_ids``, so training, the check,
prediction and evaluation agree on what each case is called.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seglight.core.errors import ConfigError, DataError
from seglight.core.io import NIFTI_SUFFIXES
from seglight.data.remote import RemoteCache, is_remote, join_path

Case = dict[str, Any]
IMAGE, LABEL = "image", "label"
LAYOUTS = ("auto", "msd", "nnunet", "folder")
ID_FIELDS = ("case_id", "id")  # an entry's own name for its case, which always wins
# nnU-Net's channel suffix: case_0000.nii.gz, case_0001.nii.gz are channels 0 and 1 of the case "case".
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
_UNSAFE_IN_NAMES = re.compile(r"[^\w.+-]+")  # letters of any script stay: ids are for people to read


def read_dataset_json(root: str | Path, store: RemoteCache | None = None) -> dict[str, Any]:
    """``root/dataset.json`` as a dict, with a message naming the file when it is missing or not JSON."""
    store = store or RemoteCache()
    if not is_remote(root) and not Path(root).expanduser().is_dir():
        raise DataError(f"data.root {root}: no such folder")
    index = join_path(root, "dataset.json")
    if not store.exists(index):
        raise DataError(f"{index}: not found; data.root must hold a dataset.json (MSD or nnU-Net layout)")
    meta = _parse_json(store.read_text(index), index)
    if not isinstance(meta, Mapping):
        raise DataError(f"{index}: is not a JSON object")
    return dict(meta)


def read_msd_datalist(
    root: str | Path,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    store: RemoteCache | None = None,
    meta: Mapping[str, Any] | None = None,
    others: Sequence[Case] = (),
) -> list[Case]:
    """Read ``root/dataset.json`` (Medical Segmentation Decathlon layout) and return its training cases.

    ``others``: cases of the same dataset from another source, named alike (see ``assign_case_ids``).
    """
    meta = meta if meta is not None else read_dataset_json(root, store)
    index = join_path(root, "dataset.json")
    if "training" not in meta:
        raise DataError(
            f'{index}: has no "training" list of {{"{_keys(image_key)}": ..., "{label_key}": ...}} entries'
        )
    return resolve_datalist(meta["training"], root, image_key, label_key, source=str(index), others=others)


def read_nnunet_datalist(
    root: str | Path, store: RemoteCache | None = None, meta: Mapping[str, Any] | None = None
) -> list[Case]:
    """Read an nnU-Net v2 raw dataset: one image file per channel in ``imagesTr``, labels in ``labelsTr``."""
    store = store or RemoteCache()
    meta = meta if meta is not None else read_dataset_json(root, store)
    index = join_path(root, "dataset.json")
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise DataError(f"{index}: nnU-Net dataset.json lacks {', '.join(map(repr, missing))}")
    ending = str(meta["file_ending"])
    if ending not in NIFTI_SUFFIXES:
        raise DataError(f"{index}: file_ending {ending!r} is not supported; seglight reads .nii.gz and .nii")
    channels = sorted(int(c) for c in meta["channel_names"])
    if "dataset" in meta:  # nnU-Net's explicit form: {case: {"images": [...], "label": ...}}
        entries = [
            {"case_id": case, IMAGE: spec["images"], LABEL: spec["label"]}
            for case, spec in dict(meta["dataset"]).items()
        ]
        return resolve_datalist(entries, root, source=str(index))
    labels_dir = join_path(root, "labelsTr")
    if not store.exists(labels_dir):
        raise DataError(f"{labels_dir}: not found; an nnU-Net dataset keeps its labels in labelsTr/")
    names = [Path(p).name for p in store.list_files(labels_dir)]
    case_ids = sorted(n[: -len(ending)] for n in names if n.endswith(ending) and not n.startswith("."))
    expected = meta.get("numTraining")
    if expected is not None and int(expected) != len(case_ids):
        raise DataError(
            f"{index}: numTraining is {expected} but {labels_dir} holds {len(case_ids)} label files "
            f"ending in {ending}"
        )
    entries = [
        {
            "case_id": case,
            IMAGE: [f"imagesTr/{case}_{c:04d}{ending}" for c in channels],
            LABEL: f"labelsTr/{case}{ending}",
        }
        for case in case_ids
    ]
    return resolve_datalist(entries, root, source=str(index))


def read_datalist_file(
    path: str | Path,
    root: str | Path | None = None,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    store: RemoteCache | None = None,
    others: Sequence[Case] = (),
) -> tuple[list[Case], dict[str, Any]]:
    """Cases of a CSV or JSON datalist (paths relative to ``root``, else to the file's folder), and its extra keys.

    CSV: a header row naming the columns; ``image_key`` may be a list of columns, one per channel.
    JSON: a list of entries, or an object whose ``"training"`` holds them (MONAI's datalist format), whose
    other keys (``labels``, ``modality``...) are returned alongside.
    """
    entries, meta, _ = read_entries(path, store, "training", option="data.datalist")
    base = root if root is not None else parent_of(str(path))
    return resolve_datalist(entries, base, image_key, label_key, source=str(path), others=others), meta


def read_entries(
    path: str | Path, store: RemoteCache | None = None, key: str | None = "training", option: str = "input"
) -> tuple[Any, dict[str, Any], str]:
    """The raw entries of a CSV or JSON datalist, the JSON object's other keys, and which list was read.

    JSON objects hold their entries under ``key``; ``None`` takes the ``"test"`` list when there is one, else
    ``"training"`` (what prediction reads from a dataset.json). ``option`` names the setting in messages.
    """
    store = store or RemoteCache()
    text_path = str(path)
    if not store.exists(text_path):
        raise DataError(f"{option}={text_path}: file not found")
    text = store.read_text(text_path)
    if text_path.lower().endswith(".csv"):
        rows = [
            {k.strip(): (v or "").strip() for k, v in row.items() if k}
            for row in csv.DictReader(io.StringIO(text))
        ]
        return [row for row in rows if any(row.values())], {}, "rows"
    if not text_path.lower().endswith(".json"):
        raise ConfigError(f"{option}={text_path}: a datalist must end in .csv or .json")
    data = _parse_json(text, text_path)
    if not isinstance(data, Mapping):
        return data, {}, "list"
    chosen = key or ("test" if data.get("test") else "training")
    if chosen not in data:
        raise DataError(f'{text_path}: has no "{chosen}" list of entries')
    return data[chosen], {k: v for k, v in data.items() if k != chosen}, chosen


def resolve_datalist(
    entries: Any,
    root: str | Path | None,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    source: str = "data.datalist",
    require_label: bool = True,
    key_options: str = "data.image_key / data.label_key",
    others: Sequence[Case] = (),
) -> list[Case]:
    """Check a datalist's keys, make its paths absolute (relative ones are taken from ``root``) and name the cases.

    ``image_key`` may name several keys (one file per channel): their files become the case's image list.
    Without ``require_label`` (prediction) an entry's label is kept when it has one. Case ids come from
    ``assign_case_ids``: an entry's ``case_id`` or ``id`` field, else its image path (``others``: cases of the
    same dataset read from another source, whose images take part in choosing how to name these).
    """
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise DataError(f"{source}: the list of entries is empty or not a list")
    image_keys = [image_key] if isinstance(image_key, str) else list(image_key)
    base = root if root is not None else Path.cwd()
    cases: list[Case] = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"{source}: entry {number} is not a mapping of keys to paths")
        needed = [*image_keys, label_key] if require_label else image_keys
        missing = [key for key in needed if _blank(entry.get(key))]
        if missing:
            raise DataError(
                f"{source}: entry {number} has no {' or '.join(repr(k) for k in missing)} key "
                f"(it has {', '.join(map(repr, entry))}); set {key_options} to match"
            )
        # Inside seglight a case always uses the keys "image" and "label", whatever the datalist calls them.
        case: Case = {k: v for k, v in entry.items() if k not in (*image_keys, label_key, *ID_FIELDS)}
        image = entry[image_keys[0]] if len(image_keys) == 1 else [entry[k] for k in image_keys]
        case[IMAGE] = _absolute(image, base)
        if not _blank(entry.get(label_key)):
            case[LABEL] = _absolute(entry[label_key], base)
        explicit = next((entry[k] for k in ID_FIELDS if not _blank(entry.get(k))), None)
        if explicit is not None:
            case["case_id"] = str(explicit).strip()
        cases.append(case)
    return assign_case_ids(cases, source, others=others)


def assign_case_ids(
    cases: list[Case],
    source: str,
    name_parts: Sequence[Sequence[str]] | None = None,
    others: Sequence[Case] = (),
) -> list[Case]:
    """Give every case a unique, meaningful ``case_id``, by one rule for the whole dataset; returns ``cases``.

    A case's own ``case_id`` (an entry's ``case_id`` or ``id`` field) always wins. The others are named, all
    alike, by the first of these that tells them apart: the image file name without ``.nii``/``.nii.gz`` (and
    without nnU-Net's ``_0000`` channel suffix when the image is one file per channel); else the shortest
    trailing run of the image's folders (``.../subj_001/img.nii.gz`` -> ``subj_001``; ``site_a/subj_001`` ->
    ``site_a_subj_001``); else those folders and the file name. ``name_parts`` replaces the image path with the
    parts that name each case (subject folders: the folders matched by the patterns), and only the folder
    stages apply. ``others`` are cases of the same dataset from another source (training cases, when naming a
    validation source): their images take part in choosing the rule, so both sources are named alike. Ids are
    made safe as file names. Two cases with the same image file, or the same id, are a DataError naming both.
    """
    firsts = [_first_file(case.get(IMAGE)) for case in cases]
    elsewhere = {_first_file(c.get(IMAGE)) for c in others}
    seen: dict[str, int] = {}
    for index, first in enumerate(firsts):
        if first is None:
            continue
        if first in elsewhere:
            raise DataError(
                f"{source}: entry {index} has the image {first}, which the other source (the training cases) "
                "has too; a case belongs to one source"
            )
        if first in seen:
            raise DataError(
                f"{source}: entries {seen[first]} and {index} both have the image {first}; "
                "each case needs an image of its own"
            )
        seen[first] = index
    explicit = {i: str(c["case_id"]) for i, c in enumerate(cases) if not _blank(c.get("case_id"))}
    for index, case_id in explicit.items():
        if case_id in (".", "..") or case_id.startswith(".") or re.search(r"[/\\\x00-\x1f]", case_id):
            raise DataError(
                f"{source}: entry {index} has the id {case_id!r}, which cannot name an output file; "
                "use an id without slashes that does not start with '.'"
            )
    # The rule is chosen over every case's image, so that cases named by their own id field do not change how
    # the others are named; then the others take their names from it.
    named = [i for i in range(len(cases)) if name_parts is not None or firsts[i] is not None]
    if name_parts is None:
        context = [f for f in (_first_file(c.get(IMAGE)) for c in others) if f is not None]
        paths = [str(firsts[i]) for i in named] + context
        multi = [isinstance(cases[i].get(IMAGE), list) for i in named]
        multi += [isinstance(c.get(IMAGE), list) for c in others if _first_file(c.get(IMAGE))]
        candidates = _path_candidates([_path_parts(p) for p in paths], multi)
    else:
        paths = [str(firsts[i] or name_parts[i]) for i in named]
        candidates = _folder_candidates([list(name_parts[i]) for i in named])
    names = _first_unique(candidates)
    if names is None:
        last = candidates[-1] if candidates else []
        i, j = _first_clash(last)
        raise DataError(
            f"{source}: {paths[i]} and {paths[j]} would both be case {last[i]!r}; give them an id field"
        )
    names = names[: len(named)]
    derived = dict(zip(named, names, strict=True))
    ids = {**derived, **explicit}
    owner: dict[str, int] = {}
    for index in range(len(cases)):
        case_id = ids[index]
        if case_id in owner:
            first = owner[case_id]
            raise DataError(
                f"{source}: {_describe(cases, first, firsts)} and {_describe(cases, index, firsts)} both have "
                f"the case id {case_id!r}; case ids must be unique"
            )
        owner[case_id] = index
        cases[index]["case_id"] = case_id
    return cases


def safe_name(text: str) -> str:
    """``text`` usable as a file name on any system: runs of characters other than letters, digits and ``._+-``
    become ``_``."""
    return _UNSAFE_IN_NAMES.sub("_", text).strip("_").lstrip(".") or "case"


def image_stem(path: str, channel_file: bool = False) -> str:
    """The file name without ``.nii``/``.nii.gz``; without nnU-Net's ``_0000`` suffix for a channel file."""
    stem = case_id_of(path)
    return CHANNEL_SUFFIX.sub("", stem) if channel_file else stem


def _path_candidates(parts: list[list[str]], multi: list[bool]) -> list[list[str]]:
    """Id candidates stage by stage (file name; trailing folders; trailing folders and file name)."""
    if not parts:
        return [[]]
    depth = max(len(p) - 1 for p in parts)
    stems = [image_stem(p[-1], m) for p, m in zip(parts, multi, strict=True)]
    stages = [stems]
    for k in range(1, depth + 1):
        stages.append([_join(p[:-1][-k:]) for p in parts])
    for k in range(1, depth + 1):
        stages.append([_join([*p[:-1][-k:], s]) for p, s in zip(parts, stems, strict=True)])
    return stages


def _folder_candidates(parts: list[list[str]]) -> list[list[str]]:
    """Id candidates from the folders that name each case: the last one, the last two, and so on."""
    depth = max((len(p) for p in parts), default=0)
    return [[_join(p[-k:]) for p in parts] for k in range(1, depth + 1)] or [[]]


def _first_unique(stages: list[list[str]]) -> list[str] | None:
    for stage in stages:
        safe = [safe_name(n) for n in stage]
        if len(set(safe)) == len(safe):
            return safe
    return None


def _first_clash(names: list[str]) -> tuple[int, int]:
    seen: dict[str, int] = {}
    for index, name in enumerate(safe_name(n) for n in names):
        if name in seen:
            return seen[name], index
        seen[name] = index
    return 0, 0


def _join(parts: Sequence[str]) -> str:
    return "_".join(p for p in parts if p)


def _path_parts(path: str | None) -> list[str]:
    """The folders and file name of a local path or URL (the protocol left out)."""
    text = str(path or "").split("://", 1)[-1]
    return [p for p in text.replace("\\", "/").split("/") if p not in ("", ".")]


def _first_file(image: Any) -> str | None:
    if _blank(image):
        return None
    if isinstance(image, Sequence) and not isinstance(image, str):
        return str(image[0]) if image else None
    return str(image)


def _describe(cases: list[Case], index: int, firsts: list[str | None]) -> str:
    return f"entry {index} ({firsts[index]})" if firsts[index] else f"entry {index}"


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def declared_labels(meta: Mapping[str, Any]) -> dict[int, str]:
    """Label values and names of a dataset.json: MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}``.

    nnU-Net region labels (``{"tumour": [1, 2]}``) name no single value and are left out.
    """
    labels = meta.get("labels")
    if not isinstance(labels, Mapping):
        return {}
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        return {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)}


def declared_label_values(meta: Mapping[str, Any]) -> set[int]:
    """Every label value a dataset.json allows, region labels' values included."""
    values = set(declared_labels(meta))
    for value in (meta.get("labels") or {}).values() if isinstance(meta.get("labels"), Mapping) else ():
        if isinstance(value, Sequence) and not isinstance(value, str):
            values.update(int(v) for v in value)
    return values


def declared_channels(meta: Mapping[str, Any]) -> int | None:
    """Input channels a dataset.json declares (nnU-Net ``channel_names``, MSD ``modality``), if any."""
    for key in ("channel_names", "modality"):
        if isinstance(meta.get(key), Mapping) and meta[key]:
            return len(meta[key])
    return None


def case_id_of(path: str | Sequence[str]) -> str:
    """A case's name from its image path: the file name without .nii/.nii.gz (first channel's, if several)."""
    first = path[0] if isinstance(path, Sequence) and not isinstance(path, str) else path
    name = str(first).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _absolute(path: Any, base: str | Path) -> Any:
    if isinstance(path, Sequence) and not isinstance(path, str):
        return [_absolute(p, base) for p in path]
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return join_path(base, text)


def parent_of(path: str) -> str:
    """The folder holding a local file (absolute) or a remote object (a URL)."""
    if is_remote(path):
        return path.rsplit("/", 1)[0]
    return str(Path(path).expanduser().resolve().parent)


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source}: not valid JSON ({exc})") from None


def _keys(key: str | Sequence[str]) -> str:
    return key if isinstance(key, str) else "/".join(key)
