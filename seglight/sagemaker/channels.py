"""What a SageMaker input channel holds, and the seglight data options that read it.

A channel is a local folder (``SM_CHANNEL_<NAME>``) with whatever the job's S3 prefix held. Recognised, in
this order: ``dataset.json`` (MSD or nnU-Net v2 raw), one ``.json``/``.csv`` datalist, subject folders
(``<case>/img.nii.gz`` + ``<case>/label.nii.gz``); when the channel holds a single folder, inside it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglight.core.errors import DataError
from seglight.core.io import is_nifti

# Keys a datalist may use for the image and the label, most usual first (the lab writes "mask").
IMAGE_KEYS = ("image", "img", "images", "scan", "volume")
LABEL_KEYS = ("label", "mask", "seg", "segmentation", "labels", "gt")
# Subject folders: file names of the image and the label in each case folder (seglight's data=folder defaults).
SUBJECT_IMAGE, SUBJECT_LABEL = "img.nii.gz", "label.nii.gz"
LABEL_WORDS = ("label", "mask", "seg", "gt")
EXPECTED = (
    "dataset.json (MSD or nnU-Net), one .json or .csv datalist, or one folder per subject "
    f"(<case>/{SUBJECT_IMAGE} and <case>/{SUBJECT_LABEL})"
)
# How deep a channel may nest its dataset in single folders (an S3 prefix that holds one dataset folder).
MAX_DEPTH = 3


@dataclass(frozen=True)
class ChannelData:
    """A channel's dataset: its layout (``dataset``, ``datalist`` or ``folder``) and the file or folder."""

    layout: str
    path: Path


def find_data(channel: str, folder: Path, options: Mapping[str, Any] | None = None) -> ChannelData:
    """The dataset a channel folder holds, or a DataError naming the folder and what was expected.

    ``options``: the job's seglight options; ``data.image_key`` / ``data.label_key`` there name the columns a
    datalist must have (else the usual names are looked for).
    """
    options = options or {}
    if not folder.is_dir():
        raise DataError(f"{channel} channel {folder}: no such folder; expected {EXPECTED}")
    if not _visible(folder):
        raise DataError(f"{channel} channel {folder} is empty; expected {EXPECTED}")
    current = folder
    for _ in range(MAX_DEPTH + 1):
        found = _data_in(channel, current, options)
        if found is not None:
            return found
        inside = _visible(current)
        if len(inside) != 1 or not inside[0].is_dir():
            break
        current = inside[0]
    listing = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in _visible(folder))[:8])
    raise DataError(
        f"{channel} channel {folder} holds nothing seglight can read ({listing}); expected {EXPECTED}"
    )


def _data_in(channel: str, folder: Path, options: Mapping[str, Any]) -> ChannelData | None:
    if (folder / "dataset.json").is_file():
        return ChannelData("dataset", folder)
    # A table of something else (demographics.csv, a splits file) beside the data is not a datalist.
    datalists = sorted(
        p
        for p in _visible(folder)
        if p.is_file() and p.suffix.lower() in (".json", ".csv") and is_datalist(p, options)
    )
    if len(datalists) > 1:
        raise DataError(
            f"{channel} channel {folder} holds several datalists ({', '.join(p.name for p in datalists)}): "
            "name the one to train on with the hyperparameter data.datalist=<file name>"
        )
    if datalists:
        return ChannelData("datalist", datalists[0])
    if subject_folders(folder):
        return ChannelData("folder", folder)
    return None


def is_datalist(path: Path, options: Mapping[str, Any]) -> bool:
    """Whether a .json/.csv file lists cases: its entries have an image key and a label key."""
    try:
        keys = datalist_keys(path)
    except DataError:
        return False
    return all(
        any(key in keys for key in _as_list(options.get(option)) or candidates)
        for option, candidates in (("data.image_key", IMAGE_KEYS), ("data.label_key", LABEL_KEYS))
    )


def subject_folders(folder: Path) -> dict[str, list[str]]:
    """Case folders directly under ``folder`` that hold NIfTI files -> those files' names."""
    found = {}
    for case in sorted(p for p in _visible(folder) if p.is_dir()):
        names = sorted(p.name for p in _visible(case) if p.is_file() and is_nifti(p))
        if names:
            found[case.name] = names
    return found


def datalist_keys(path: Path) -> list[str]:
    """The keys of a datalist's entries: a CSV's header, or the first entry of a JSON list / ``"training"``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if path.suffix.lower() == ".csv":
        return [k.strip() for k in next(csv.reader(text.splitlines()), []) if k.strip()]
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    entries = data.get("training") if isinstance(data, Mapping) else data
    if isinstance(entries, list) and entries and isinstance(entries[0], Mapping):
        return [str(k) for k in entries[0]]
    raise DataError(f'{path}: not a datalist (a list of {{"image": ..., "label": ...}} entries)')


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
    label/mask/seg, are taken as label and image.
    """
    if "data.image_pattern" in options or "data.label_pattern" in options:
        return {}
    cases = subject_folders(folder)
    common = set.intersection(*(set(names) for names in cases.values())) if cases else set()
    if {SUBJECT_IMAGE, SUBJECT_LABEL} <= common or not common:
        return {}  # the defaults, or folders without common names: the folder reader names what is missing
    labels = [n for n in common if any(word in n.lower() for word in LABEL_WORDS)]
    images = sorted(common - set(labels))
    if len(labels) == 1 and len(images) == 1:
        return {"data.image_pattern": f"*/{images[0]}", "data.label_pattern": f"*/{labels[0]}"}
    raise DataError(
        f"{folder}: every case folder holds {', '.join(sorted(common))}; which is the image and which the "
        "label is not clear: name them with the hyperparameters data.image_pattern=*/<image file> and "
        "data.label_pattern=*/<label file>"
    )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _visible(folder: Path) -> list[Path]:
    # Dot files (.DS_Store, S3 folder markers some tools leave) are not data.
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError:
        return []
