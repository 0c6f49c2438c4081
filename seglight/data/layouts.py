"""What a path holds: the one detector that training (its training and validation sources), prediction, evaluation
and SageMaker channels use, so that the same folder is read the same way everywhere.

``find_layout`` looks at a local path or ``s3://`` URL in this order:

1. a file: ``dataset.json`` (a dataset, at its folder), a ``.json``/``.csv`` datalist, a ``.zip`` or a file of
   DICOM (``dicom``), else an image;
2. a folder holding ``dataset.json``: a dataset, MSD or nnU-Net v2 (``dataset_format`` tells them apart);
3. a folder holding one ``.json``/``.csv`` datalist, when the caller looks for one (``datalist_keys``);
4. subject folders matching the image/label patterns, when the caller prefers them (``prefer_subjects``);
5. a folder of NIfTI files (``files``; ``seglight.data.folders.group_channel_files`` groups nnU-Net channel files);
6. subject folders matching the image/label patterns (or, with ``SubjectPatterns.infer``, the file names common to
   every case folder);
7. DICOM files, at any depth (``dicom``: every series one case; ``seglight.data.dicom`` reads them);
8. a folder holding a single folder: inside it, up to ``nesting`` levels down.

What differs between callers is an argument: the kinds they accept, whether a case needs a label, how deep they
look, whether subject folders come first. A path that holds none of the accepted kinds is a DataError naming the
path and what was expected.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from seglight.core.errors import DataError
from seglight.core.io import NIFTI_SUFFIXES, is_nifti
from seglight.data.datalists import (
    Case,
    parent_of,
    read_dataset_json,
    read_msd_datalist,
    read_nnunet_datalist,
)
from seglight.data.dicom import is_dicom_source
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN, FolderCases, read_folder_cases
from seglight.data.remote import RemoteCache, is_remote, join_path

DATASET, DATALIST, SUBJECTS, FILES, IMAGE_FILE = "dataset", "datalist", "folder", "files", "image"
DICOM = "dicom"
KINDS = (DATASET, DATALIST, SUBJECTS, FILES, IMAGE_FILE, DICOM)
DATALIST_SUFFIXES = (".json", ".csv")
ZIP_SUFFIX = ".zip"
LABEL_WORDS = ("label", "mask", "seg", "gt")  # a file name saying it is the label, when patterns are inferred
# What each kind is, for messages: as expected of a path, and as missing from a folder.
EXPECTED = {
    DATASET: "a dataset (a folder with dataset.json, MSD or nnU-Net v2)",
    DATALIST: "a .json or .csv datalist",
    SUBJECTS: "subject folders",
    FILES: "a folder of .nii or .nii.gz files",
    IMAGE_FILE: "a .nii or .nii.gz file",
    DICOM: "DICOM series (a folder, s3:// prefix or .zip of DICOM files)",
}


@dataclass(frozen=True)
class SubjectPatterns:
    """How subject folders are found: globs relative to the folder, of a case's image (a list: one per channel)
    and label (None: no labels). ``prefix`` spells the options in messages (``data.`` in training)."""

    image: str | list[str] = DEFAULT_IMAGE_PATTERN
    label: str | None = DEFAULT_LABEL_PATTERN
    require_label: bool = True
    prefix: str = "data."
    # When nothing matches: take two file names common to every case folder, one saying label/mask/seg, as label
    # and image (SageMaker channels, whose file names nobody has told seglight).
    infer: bool = False


@dataclass(frozen=True)
class Layout:
    """What a path holds (``kind``, one of ``KINDS``) and where: the file, or the folder (a dataset's folder when
    the path was its ``dataset.json``). A dataset comes with its dataset.json (``meta``), a folder of NIfTI files
    with its ``files``, subject folders with the ``patterns`` that found them and what they found."""

    kind: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    patterns: SubjectPatterns | None = None
    subjects: FolderCases | None = None

    @property
    def index(self) -> str:
        """A dataset's ``dataset.json``."""
        return join_path(self.path, "dataset.json")


def find_layout(
    path: str | Path,
    accept: Collection[str] = KINDS,
    *,
    name: str | None = None,
    store: RemoteCache | None = None,
    subjects: SubjectPatterns | None = None,
    prefer_subjects: bool = False,
    nesting: int = 0,
    datalist_keys: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Layout:
    """What ``path`` (a local path or URL) holds, among the ``accept``-ed kinds; a DataError when none.

    Args:
        path: the file, folder or ``s3://`` prefix.
        accept: the kinds the caller reads (``KINDS``). A caller that accepts one kind of folder only gets that
            kind's reader's own message when it is not there (``dataset.json: not found``, ``no file matches``).
        name: how messages name the path (``input=scans``, ``training channel /opt/ml/...``); default the path.
        subjects: how subject folders are found (default: seglight's patterns, labels required).
        prefer_subjects: look for subject folders before NIfTI files directly in the folder.
        nesting: how many levels of single folders to look into (a channel that holds one dataset folder).
        datalist_keys: (image keys, label keys): look for one ``.json``/``.csv`` datalist in the folder whose
            entries have one of each; None looks for no datalist in a folder.
    """
    store = store or RemoteCache()
    accept = tuple(kind for kind in KINDS if kind in accept)
    subjects = subjects or SubjectPatterns()
    where = name or str(path)
    text = _existing(str(path), accept, where, store, datalists_in_folders=datalist_keys is not None)
    if _is_file(text):
        return _file_layout(text, accept, where, store)
    folder = text
    for level in range(nesting + 1):
        here = where if level == 0 else folder
        found = _folder_layout(folder, accept, store, subjects, prefer_subjects, datalist_keys, here)
        if found is not None:
            return found
        inside = visible_entries(folder, store) if level < nesting else []
        if len(inside) != 1 or not inside[0].endswith("/"):
            break
        name_inside = inside[0].rstrip("/")
        folder = join_path(folder, name_inside) if is_remote(folder) else str(Path(folder) / name_inside)
    raise DataError(_nothing_found(where, text, _folder_kinds(accept, datalist_keys), subjects, store))


def dataset_format(meta: Mapping[str, Any]) -> str:
    """``nnunet`` for an nnU-Net v2 dataset.json (``file_ending``/``channel_names``), else ``msd``."""
    return "nnunet" if "file_ending" in meta or "channel_names" in meta else "msd"


def dataset_cases(
    layout: Layout,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    store: RemoteCache | None = None,
    dataset: str = "auto",
    others: Sequence[Case] = (),
) -> list[Case]:
    """The training cases of a dataset layout: nnU-Net v2 or MSD by its dataset.json, unless ``dataset`` says."""
    if (dataset_format(layout.meta) if dataset == "auto" else dataset) == "nnunet":
        return read_nnunet_datalist(layout.path, store, layout.meta)
    return read_msd_datalist(layout.path, image_key, label_key, store, layout.meta, others)


def meta_beside(root: str | Path | None, store: RemoteCache | None = None) -> dict[str, Any]:
    """``root/dataset.json`` when there is one (labels and channel names for a datalist or subject folders)."""
    if root is None:
        return {}
    try:
        return read_dataset_json(root, store)
    except DataError:
        return {}


def entry_keys(path: str, store: RemoteCache | None = None) -> list[str]:
    """The keys of a datalist's entries: a CSV's header, or the first entry of a JSON list / ``"training"``."""
    text = (store or RemoteCache()).read_text(path)
    if path.lower().endswith(".csv"):
        return [k.strip() for k in next(csv.reader(text.splitlines()), []) if k.strip()]
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    entries = data.get("training") if isinstance(data, Mapping) else data
    if isinstance(entries, list) and entries and isinstance(entries[0], Mapping):
        return [str(k) for k in entries[0]]
    raise DataError(f'{path}: not a datalist (a list of {{"image": ..., "label": ...}} entries)')


def infer_subject_patterns(
    folder: str, patterns: SubjectPatterns, store: RemoteCache | None = None
) -> SubjectPatterns | None:
    """Patterns for the case folders directly in ``folder``: None without case folders holding NIfTI files;
    ``patterns`` unchanged when every folder holds the files they name, or when the folders share no file name
    (the folder reader then names what is missing); else the two file names common to every folder, the one
    saying label/mask/seg as the label."""
    store = store or RemoteCache()
    names: dict[str, set[str]] = {}
    for relative in store.find(folder, max_depth=2):
        case, _, file = relative.partition("/")
        if file and is_nifti(file):
            names.setdefault(case, set()).add(file)
    if not names:
        return None
    common = set.intersection(*names.values())
    given = {
        p[2:]
        for p in (patterns.image, patterns.label)
        if isinstance(p, str) and p.startswith("*/") and p.count("/") == 1
    }
    if not common or (given and given <= common):
        return patterns
    labels = sorted(n for n in common if any(word in n.lower() for word in LABEL_WORDS))
    images = sorted(common - set(labels))
    if len(labels) == 1 and len(images) == 1:
        return replace(patterns, image=f"*/{images[0]}", label=f"*/{labels[0]}")
    raise DataError(
        f"{folder}: every case folder holds {', '.join(sorted(common))}; which is the image and which the label "
        f"is not clear: name them with {patterns.prefix}image_pattern=*/<image file> and "
        f"{patterns.prefix}label_pattern=*/<label file>"
    )


def visible_entries(folder: str, store: RemoteCache | None = None) -> list[str]:
    """The names directly inside a folder or prefix, folders ending in ``/``, hidden ones (``.DS_Store``, S3
    folder markers) left out, sorted."""
    if not is_remote(folder):
        try:
            return sorted(
                p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir() if p.name[:1] != "."
            )
        except OSError:
            return []
    tops = {r.split("/", 1)[0] + ("/" if "/" in r else "") for r in (store or RemoteCache()).find(folder)}
    return sorted(tops)


# -- the steps -----------------------------------------------------------------------------------------------------


def _existing(
    text: str, accept: tuple[str, ...], where: str, store: RemoteCache, datalists_in_folders: bool
) -> str:
    """The path (``~`` expanded); a DataError when it is not there. A URL is looked up only when files are
    accepted (to tell a file from a prefix): a prefix with nothing under it is an empty folder."""
    datalist_file = DATALIST in accept and not datalists_in_folders
    takes_files = IMAGE_FILE in accept or DICOM in accept or datalist_file  # a dataset.json names its folder
    takes_folders = any(k in accept for k in (DATASET, SUBJECTS, FILES, DICOM)) or (
        DATALIST in accept and datalists_in_folders
    )
    if is_remote(text):
        if takes_files and not store.exists(text):
            raise DataError(f"{where}: no such object or prefix; expected {_either(accept)}")
        return text
    local = Path(text).expanduser()
    if not local.exists() or (not takes_files and not local.is_dir()):
        noun = "file or folder" if takes_files and takes_folders else "folder" if takes_folders else "file"
        raise DataError(f"{where}: no such {noun}; expected {_either(accept)}")
    return str(local)


def _is_file(text: str) -> bool:
    if is_remote(text):
        return text.lower().endswith((*NIFTI_SUFFIXES, *DATALIST_SUFFIXES, ZIP_SUFFIX))
    return not Path(text).is_dir()


def _file_layout(text: str, accept: tuple[str, ...], where: str, store: RemoteCache) -> Layout:
    file_name = text.rstrip("/").rsplit("/", 1)[-1]
    if file_name == "dataset.json":
        kind = DATASET
    elif file_name.lower().endswith(DATALIST_SUFFIXES):
        kind = DATALIST
    elif file_name.lower().endswith(ZIP_SUFFIX) or (not is_nifti(file_name) and is_dicom_source(text, store)):
        kind = DICOM  # a zip of DICOM files (the reader says when it holds none), or one file of a series
    else:
        kind = IMAGE_FILE  # NIfTI or not: the reader says what it is
    if kind not in accept:
        raise DataError(f"{where} is {EXPECTED[kind]}; expected {_either(accept)}")
    if kind == DATASET:
        folder = parent_of(text)
        return Layout(DATASET, folder, meta=read_dataset_json(folder, store))
    return Layout(kind, text)


def _folder_layout(
    folder: str,
    accept: tuple[str, ...],
    store: RemoteCache,
    subjects: SubjectPatterns,
    prefer_subjects: bool,
    datalist_keys: tuple[Sequence[str], Sequence[str]] | None,
    where: str,
) -> Layout | None:
    """The first accepted kind ``folder`` holds, in the module's order; None if it holds none."""
    only = _folder_kinds(accept, datalist_keys)
    only = only[0] if len(only) == 1 else None  # one kind: its reader's own message when it is not there
    if DATASET in accept and (only == DATASET or store.exists(join_path(folder, "dataset.json"))):
        return Layout(DATASET, folder, meta=read_dataset_json(folder, store))
    if DATALIST in accept and datalist_keys is not None:
        found = _datalists_in(folder, datalist_keys, store)
        if len(found) > 1:
            names = ", ".join(f.rsplit("/", 1)[-1] for f in found)
            raise DataError(
                f"{where} holds several datalists ({names}): name the one to read with data.datalist=<file name>"
            )
        if found:
            return Layout(DATALIST, found[0])
    if SUBJECTS in accept and prefer_subjects:
        layout = _subject_folders(folder, subjects, store, allow_empty=True)
        if layout is not None:
            return layout
    if FILES in accept:
        files = tuple(f for f in store.list_files(folder) if is_nifti(f))
        if files:
            return Layout(FILES, folder, files=files)
    if SUBJECTS in accept and not prefer_subjects:
        layout = _subject_folders(folder, subjects, store, allow_empty=only != SUBJECTS)
        if layout is not None:
            return layout
    if DICOM in accept and is_dicom_source(folder, store):
        return Layout(DICOM, folder)
    return None


def _subject_folders(
    folder: str, patterns: SubjectPatterns, store: RemoteCache, allow_empty: bool
) -> Layout | None:
    found = read_folder_cases(
        folder,
        patterns.image,
        patterns.label,
        store,
        require_label=patterns.require_label,
        prefix=patterns.prefix,
        allow_empty=allow_empty or patterns.infer,
    )
    if found.cases or found.incomplete:
        return Layout(SUBJECTS, folder, patterns=patterns, subjects=found)
    inferred = infer_subject_patterns(folder, patterns, store) if patterns.infer else None
    return Layout(SUBJECTS, folder, patterns=inferred) if inferred is not None else None


def _datalists_in(folder: str, keys: tuple[Sequence[str], Sequence[str]], store: RemoteCache) -> list[str]:
    """The ``.json``/``.csv`` files directly in ``folder`` whose entries have an image key and a label key (a
    table of something else beside the data, demographics.csv or a splits file, is not a datalist)."""
    found = []
    for path in store.list_files(folder):
        file_name = path.rsplit("/", 1)[-1]
        if file_name.startswith(".") or not file_name.lower().endswith(DATALIST_SUFFIXES):
            continue
        try:
            has = set(entry_keys(path, store))
        except DataError:
            continue
        if all(has & set(wanted) for wanted in keys):
            found.append(path)
    return found


def _folder_kinds(accept: tuple[str, ...], datalist_keys: Any) -> tuple[str, ...]:
    """The accepted kinds a folder can be, in the order messages name them."""
    kinds = (FILES, SUBJECTS, DATASET, *((DATALIST,) if datalist_keys is not None else ()), DICOM)
    return tuple(k for k in kinds if k in accept)


def _nothing_found(
    where: str, folder: str, kinds: tuple[str, ...], subjects: SubjectPatterns, store: RemoteCache
) -> str:
    missing = {
        FILES: ".nii or .nii.gz files",
        SUBJECTS: f"subject folders matching {subjects.prefix}image_pattern={_pattern(subjects.image)}",
        DATASET: "dataset.json (MSD or nnU-Net v2)",
        DATALIST: ".json or .csv datalist",
        DICOM: "DICOM files",
    }
    items = [missing[k] for k in kinds]
    listed = items[0] if len(items) == 1 else ", no ".join(items[:-1]) + " and no " + items[-1]
    inside = visible_entries(folder, store)
    if inside:
        shown = ", ".join(inside[:8]) + (", ..." if len(inside) > 8 else "")
        message = f"{where} holds nothing seglight can read ({shown}): no {listed}"
    else:
        message = f"{where} is empty: it holds no {listed}"
    if SUBJECTS in kinds:
        message += (
            f"; for subject folders laid out otherwise, set {subjects.prefix}image_pattern=... (a glob relative to "
            "the folder, e.g. '*/t1.nii.gz')"
        )
    return message


def _either(accept: tuple[str, ...]) -> str:
    named = [EXPECTED[k] for k in accept]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]


def _pattern(pattern: str | Sequence[str]) -> str:
    return repr(pattern) if isinstance(pattern, str) else repr(list(pattern))
