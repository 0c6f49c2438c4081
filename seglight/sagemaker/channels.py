"""What a SageMaker input channel holds, and the seglight data options that read it.

A channel is a local folder (``SM_CHANNEL_<NAME>``) with whatever the job's S3 prefix held, read by the detector
training, prediction and evaluation use (``seglight.data.layouts``): ``dataset.json`` (MSD or nnU-Net v2 raw),
one ``.json``/``.csv`` datalist, or subject folders (``<case>/img.nii.gz`` + ``<case>/label.nii.gz``, or two file
names common to every case folder); when the channel holds a single folder, inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglight.core.errors import DataError
from seglight.data.folders import DEFAULT_IMAGE_PATTERN, DEFAULT_LABEL_PATTERN
from seglight.data.layouts import (
    DATALIST,
    DATASET,
    SUBJECTS,
    SubjectPatterns,
    entry_keys,
    find_layout,
    infer_subject_patterns,
)

# Keys a datalist may use for the image and the label, most usual first (the lab writes "mask").
IMAGE_KEYS = ("image", "img", "images", "scan", "volume")
LABEL_KEYS = ("label", "mask", "seg", "segmentation", "labels", "gt")
# How deep a channel may nest its dataset in single folders (an S3 prefix that holds one dataset folder).
MAX_DEPTH = 3
PATTERN_OPTIONS = ("data.image_pattern", "data.label_pattern")


@dataclass(frozen=True)
class ChannelData:
    """A channel's dataset: its layout (``dataset``, ``datalist`` or ``folder``) and the file or folder."""

    layout: str
    path: Path


def find_data(channel: str, folder: Path, options: Mapping[str, Any] | None = None) -> ChannelData:
    """The dataset a channel folder holds, or a DataError naming the folder and what was expected.

    ``options``: the job's seglight options; ``data.image_key`` / ``data.label_key`` there name the columns a
    datalist must have (else the usual names are looked for), ``data.image_pattern`` / ``data.label_pattern``
    how subject folders name their files (else seglight's names, or two names common to every case folder).
    """
    options = options or {}
    patterns = SubjectPatterns(
        options.get("data.image_pattern") or DEFAULT_IMAGE_PATTERN,
        options.get("data.label_pattern") or DEFAULT_LABEL_PATTERN,
        infer=not any(option in options for option in PATTERN_OPTIONS),
    )
    keys = (
        _as_list(options.get("data.image_key")) or IMAGE_KEYS,
        _as_list(options.get("data.label_key")) or LABEL_KEYS,
    )
    found = find_layout(
        str(folder),
        (DATASET, DATALIST, SUBJECTS),
        name=f"{channel} channel {folder}",
        subjects=patterns,
        nesting=MAX_DEPTH,
        datalist_keys=keys,
    )
    return ChannelData(found.kind, Path(found.path))


def datalist_keys(path: Path) -> list[str]:
    """The keys of a datalist's entries: a CSV's header, or the first entry of a JSON list / ``"training"``."""
    return entry_keys(str(path))


def datalist_key_options(path: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """``data.image_key`` / ``data.label_key`` for the keys a datalist uses, unless given as hyperparameters."""
    keys = datalist_keys(path)
    chosen: dict[str, Any] = {}
    for option, candidates, default in (
        ("data.image_key", IMAGE_KEYS, "image"),
        ("data.label_key", LABEL_KEYS, "label"),
    ):
        if option in options:
            continue
        key = next((k for k in candidates if k in keys), None)
        if key is None:
            raise DataError(
                f"{path}: its entries have the keys {', '.join(keys)}; none is a usual {default} key "
                f"({', '.join(candidates)}): name it with the hyperparameter {option}=<key>"
            )
        if key != default:
            chosen[option] = key
    return chosen


def subject_pattern_options(folder: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """``data.image_pattern`` / ``data.label_pattern`` when the case folders name their files otherwise.

    When every case folder holds ``img.nii.gz`` and ``label.nii.gz`` (the defaults), or the patterns are
    given as hyperparameters, nothing is added; else two file names common to all folders, one of which says
    label/mask/seg, are taken as label and image (``seglight.data.layouts.infer_subject_patterns``).
    """
    if any(option in options for option in PATTERN_OPTIONS):
        return {}
    defaults = SubjectPatterns()
    inferred = infer_subject_patterns(str(folder), defaults)
    if inferred is None or inferred == defaults:
        return {}  # the defaults, or folders without common names: the folder reader names what is missing
    return {"data.image_pattern": inferred.image, "data.label_pattern": inferred.label}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
