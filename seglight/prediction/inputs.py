"""What to predict: the images named by ``input=``, read by the same readers and named by the same case ids as
in training, with the data settings a model was trained with (image keys, layout, patterns).

``input=`` may be a NIfTI file, a plain folder (or ``s3://`` prefix) of them, subject folders, a dataset folder
(holding ``dataset.json``), a ``dataset.json``, a JSON/CSV datalist, or DICOM series (a folder, ``s3://`` prefix or
``.zip`` of DICOM files: every series one case, converted to NIfTI by ``seglight.data.dicom``); which one it is,
``seglight.data.layouts`` tells, as for training, evaluation and SageMaker channels. A datalist's image entries may
be series folders, converted as training converts them. Labels are never required.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglight.core.errors import DataError
from seglight.data.datalists import (
    IMAGE,
    LABEL,
    Case,
    assign_case_ids,
    case_id_of,
    parent_of,
    read_entries,
    read_nnunet_datalist,
    resolve_datalist,
)
from seglight.data.dicom import DicomSeries, dicom_volumes, entry_volumes, is_series_entry
from seglight.data.folders import (
    DEFAULT_IMAGE_PATTERN,
    DEFAULT_LABEL_PATTERN,
    FolderCases,
    group_channel_files,
)
from seglight.data.layouts import (
    DATALIST,
    DATASET,
    DICOM,
    FILES,
    IMAGE_FILE,
    Layout,
    SubjectPatterns,
    dataset_format,
    find_layout,
)
from seglight.data.remote import RemoteCache, is_remote


@dataclass
class InputCase:
    """One image to segment: its case id (the output file's stem), its file(s), and its label if it has one.

    ``problem`` says why the case cannot be predicted (a subject folder without one of its channels, say);
    such a case is reported as failed rather than predicted. A DICOM series' case comes with its ``series`` (its
    image is the series converted to NIfTI) and the ``source`` that messages name instead of the converted file.
    """

    case_id: str
    image: str | list[str]
    label: str | None = None
    problem: str | None = None
    series: DicomSeries | None = None
    source: str | None = None

    @property
    def first_file(self) -> str:
        """What names the case in messages: its source, else the image's (first channel's) file."""
        if self.source is not None:
            return self.source
        return self.image if isinstance(self.image, str) else self.image[0]


def list_inputs(
    source: str | Path,
    data: Mapping[str, Any] | None = None,
    datalist_key: str | None = None,
    store: RemoteCache | None = None,
    channels: int | None = None,
    dicom_cache_dir: str | Path | None = None,
) -> list[InputCase]:
    """The cases to predict from ``source``, local or ``s3://``, read as the model's training data was read.

    Args:
        source: a NIfTI file; a folder (prefix) of them, where nnU-Net's ``case_0000``, ``case_0001`` names make
            one case with a channel per file; subject folders (found by the trained ``image_pattern``); a dataset
            folder or ``dataset.json`` (its ``test`` list when it has one, else ``training``; nnU-Net: its
            training cases); a JSON list of paths or entries, or a CSV, with the trained image keys.
        data: the data settings the model was trained with (``SegDataModule`` hyperparameters): ``image_key``,
            ``layout``, ``image_pattern``, ``label_pattern``, and ``datalist``/``root`` (a datalist that was
            trained on takes its relative paths from the same ``root``).
        datalist_key: the list of a dataset.json or JSON datalist to predict.
        channels: the model's input channels, when known, to tell nnU-Net channel files from numbered cases.
        dicom_cache_dir: where DICOM series are converted to NIfTI (default: seglight's cache).

    Remote NIfTI files are not fetched here; prediction fetches them one case at a time. DICOM series are read and
    converted here (their headers tell what the cases are); a series that is no volume is a failed case.
    """
    data = dict(data or {})
    store = store or RemoteCache()
    text = str(source)
    if not is_remote(text):
        text = str(Path(text).expanduser().resolve())
    patterns = SubjectPatterns(
        data.get("image_pattern") or DEFAULT_IMAGE_PATTERN,
        data.get("label_pattern") or DEFAULT_LABEL_PATTERN,
        require_label=False,
        prefix="",
    )
    # Trained on subject folders: a folder is looked at as subject folders before as a folder of scans.
    prefer_subjects = data.get("layout") == "folder"
    layout = find_layout(
        text, name=f"input={source}", store=store, subjects=patterns, prefer_subjects=prefer_subjects
    )
    if layout.kind == IMAGE_FILE:
        return [InputCase(case_id_of(layout.path), layout.path)]
    if layout.kind == DICOM:
        return _series_inputs(layout.path, store, dicom_cache_dir)
    if layout.kind == DATASET:
        return _with_series_converted(
            _dataset_inputs(layout, data, datalist_key, store), store, dicom_cache_dir
        )
    if layout.kind == DATALIST:
        cases = _datalist_inputs(layout.path, data, datalist_key, store)
        return _with_series_converted(cases, store, dicom_cache_dir)
    if layout.kind == FILES:
        return _plain_folder_inputs(layout.path, list(layout.files), channels)
    return _subject_inputs(layout.subjects or FolderCases([], []))


def _series_inputs(source: str, store: RemoteCache, cache_dir: str | Path | None) -> list[InputCase]:
    """One case per DICOM series of ``source``, converted; a series that is no volume as a failed case."""
    converted = dicom_volumes(source, store, cache_dir, log_skipped=False)  # reported as failed cases
    cases = []
    for case_id, series in converted.series.items():
        problem = converted.skipped.get(case_id)
        image = str(converted.volumes[case_id]) if problem is None else series.first_file
        cases.append(InputCase(case_id, image, problem=problem, series=series, source=series.describe()))
    return cases


def _with_series_converted(
    cases: list[InputCase], store: RemoteCache, cache_dir: str | Path | None
) -> list[InputCase]:
    """The cases with every image entry that is a DICOM series folder replaced by its NIfTI volume, as training
    reads them (``seglight.data.dicom.entry_volumes``); one that holds no single volume is a failed case."""
    paths = [p for c in cases for p in ([c.image] if isinstance(c.image, str) else c.image)]
    series = [p for p in paths if is_series_entry(p)]
    if not series:
        return cases
    converted, problems = entry_volumes(series, store, cache_dir)
    for case in cases:
        files = [case.image] if isinstance(case.image, str) else list(case.image)
        wrong = [problems[f] for f in files if f in problems]
        if wrong:
            case.problem = "; ".join(wrong)
            continue
        if any(f in converted for f in files):
            case.source = files[0]
            case.series = converted[files[0]][0] if files[0] in converted else None  # the DICOM SEG's source
            local = [str(converted[f][1]) if f in converted else f for f in files]
            case.image = local[0] if isinstance(case.image, str) else local
    return cases


def _dataset_inputs(
    layout: Layout, data: Mapping[str, Any], datalist_key: str | None, store: RemoteCache
) -> list[InputCase]:
    if datalist_key is None and dataset_format(layout.meta) == "nnunet":
        # Its training cases, found as training finds them.
        cases = read_nnunet_datalist(layout.path, store, layout.meta)
        return [InputCase(c["case_id"], c[IMAGE], c.get(LABEL)) for c in cases]
    return _datalist_inputs(layout.index, data, datalist_key, store)


def _datalist_inputs(
    index: str, data: Mapping[str, Any], datalist_key: str | None, store: RemoteCache
) -> list[InputCase]:
    entries, _, key = read_entries(index, store, datalist_key)
    if not isinstance(entries, list) or not entries:
        raise DataError(f'input={index}: has no "{key}" list of images to predict (set datalist_key=...)')
    entries = [e if isinstance(e, Mapping) else {IMAGE: e} for e in entries]  # MSD test lists hold paths
    image_key = _image_key(entries, data.get("image_key") or IMAGE, index, key)
    cases = resolve_datalist(
        entries,
        _base(index, data),
        image_key,
        str(data.get("label_key") or LABEL),
        source=f"input={index}",
        require_label=False,
        key_options="image_key (as in training)",
    )
    return [InputCase(c["case_id"], c[IMAGE], c.get(LABEL)) for c in cases]


def _image_key(
    entries: Sequence[Mapping[str, Any]], trained: str | Sequence[str], index: str, key: str
) -> str | list[str]:
    """The trained image key(s) when every entry has them, else ``image`` (MSD's) when every entry has that."""
    keys = [trained] if isinstance(trained, str) else [str(k) for k in trained]

    def has(entry: Mapping[str, Any], wanted: list[str]) -> bool:
        return all(entry.get(k) not in (None, "") for k in wanted)

    for candidate in (keys, [IMAGE]):
        if all(has(e, candidate) for e in entries):
            return candidate[0] if len(candidate) == 1 else candidate
    number = next(n for n, e in enumerate(entries) if not has(e, keys))
    raise DataError(
        f"input={index}: {key} entry {number} has no {' and '.join(map(repr, keys))} "
        f"(the image key{'s' if len(keys) > 1 else ''} the model was trained with) and no 'image'"
    )


def _base(index: str, data: Mapping[str, Any]) -> str:
    """Where relative paths start: the trained ``root`` for the datalist the model was trained on, else its folder."""
    trained = data.get("datalist")
    if isinstance(trained, str) and data.get("root") and _same_file(trained, index):
        root = str(data["root"])
        return root if is_remote(root) else str(Path(root).expanduser())
    return parent_of(index)


def _same_file(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a == b
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _subject_inputs(found: FolderCases) -> list[InputCase]:
    """The cases of subject folders, those with a missing or extra file as failed cases."""
    cases = [InputCase(c["case_id"], c[IMAGE], c.get(LABEL)) for c in found.cases]
    cases += [InputCase(i.case_id, i.where, problem="; ".join(i.messages())) for i in found.incomplete]
    return sorted(cases, key=lambda c: c.case_id)


def _plain_folder_inputs(folder: str, files: list[str], channels: int | None) -> list[InputCase]:
    """One case per file, or per nnU-Net case name when the files follow ``{case}_{channel:04d}``."""
    grouped = group_channel_files(files, channels)
    named = grouped if grouped is not None else [(case_id_of(f), f) for f in files]
    cases: list[Case] = [{"case_id": name, IMAGE: image} for name, image in named]
    assign_case_ids(cases, f"input={folder}")  # a.nii beside a.nii.gz: both would be written as a.nii.gz
    return [InputCase(c["case_id"], c[IMAGE]) for c in cases]
