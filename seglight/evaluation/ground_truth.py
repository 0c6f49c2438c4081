"""Where the masks to compare are: the predicted masks in a folder, and the ground truth however it is laid out.

The ground truth is read by the detector training and prediction use (``seglight.data.layouts``), so a dataset,
datalist or subject folders name their cases in evaluation as they were named in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seglight.data.datalists import LABEL, case_id_of, declared_labels, read_datalist_file
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN
from seglight.data.layouts import (
    DATALIST,
    DATASET,
    FILES,
    SUBJECTS,
    SubjectPatterns,
    dataset_cases,
    find_layout,
    meta_beside,
)
from seglight.data.remote import RemoteCache, is_remote


def masks_in_folder(folder: str | Path, option: str, store: RemoteCache | None = None) -> dict[str, str]:
    """``case -> file`` for the NIfTI masks directly inside a local folder or ``s3://`` prefix; a DataError naming
    ``option`` when there are none.

    A mask's case is its file name without ``.nii``/``.nii.gz``, as ``seglight.predict`` names its outputs.
    """
    layout = find_layout(folder, (FILES,), name=f"{option}={folder}", store=store)
    return {case_id_of(f): f for f in layout.files}


def ground_truth(
    gt: Any,
    label_key: str = "label",
    image_key: str | Sequence[str] = "image",
    image_pattern: str | Sequence[str] = DEFAULT_IMAGE_PATTERN,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    store: RemoteCache | None = None,
) -> tuple[dict[str, str], dict[int, str]]:
    """``(case -> local label file, label value -> name)`` of the ground truth, named as training names cases.

    ``gt`` is a list of cases (``case_id`` and ``label``); a dataset (a folder holding ``dataset.json``, MSD or
    nnU-Net, or the file itself); a JSON/CSV datalist (``image_key``/``label_key`` entries); a folder of label
    files (named ``<case>.nii.gz``); or subject folders (``label_pattern``; ``image_pattern`` so that cases are
    named exactly as in training). Local or ``s3://`` alike; remote labels are fetched into the cache.
    """
    if isinstance(gt, Sequence) and not isinstance(gt, str):  # cases from a data module
        return {str(c["case_id"]): str(c[LABEL]) for c in gt}, {}
    store = store or RemoteCache()
    text = str(gt) if is_remote(gt) else str(Path(gt).expanduser().resolve())
    patterns = SubjectPatterns(image_pattern, label_pattern, require_label=False, prefix="")
    layout = find_layout(
        text, (DATASET, DATALIST, FILES, SUBJECTS), name=f"gt={gt}", store=store, subjects=patterns
    )
    if layout.kind == FILES:
        return _localized({case_id_of(f): f for f in layout.files}, store), {}
    if layout.kind == DATALIST:
        cases, meta = read_datalist_file(layout.path, None, image_key, label_key, store)
        names = declared_labels(meta)
    elif layout.kind == DATASET:
        cases, names = dataset_cases(layout, image_key, label_key, store), declared_labels(layout.meta)
    else:
        found = layout.subjects
        cases = found.cases if found is not None else []
        names = declared_labels(meta_beside(layout.path, store))
    labels = {str(c["case_id"]): str(c[LABEL]) for c in cases if c.get(LABEL)}
    return _localized(labels, store), names


def _localized(labels: dict[str, str], store: RemoteCache) -> dict[str, str]:
    """The label files with remote ones fetched (a file that cannot be fetched keeps its URL: scoring names it)."""
    fetched, _ = store.fetch_all([f for f in labels.values() if is_remote(f)])
    return {case: str(fetched.get(f, f)) for case, f in labels.items()}
