"""Masks as DICOM Segmentation objects, for review in a DICOM viewer (OHIF, 3D Slicer, a PACS).

One object per series, written with highdicom: it references the source series and, frame by frame, the image
each segmentation frame lies on; it is on the source grid (each source frame's pixels take the mask's nearest
voxel at their own position, so a mask on the converted NIfTI grid maps back exactly); it has one segment per
label, with the label's name, a SNOMED-CT code where the name is one (a generic "Tissue" otherwise), a display
colour, and the algorithm that made it (seglight, its version, AUTOMATIC). highdicom is an optional dependency:
``pip install "seglight[dicom]"``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from seglight.core.errors import ConfigError, DataError, describe_exception
from seglight.core.io import atomic_path
from seglight.data.dicom import INSTALL_HINT, DicomSeries
from seglight.data.dicom_geometry import frame_geometry, sample_onto_frame

log = logging.getLogger("seglight")

ALGORITHM = "seglight"
# A voxel of the mask must be within this share of a voxel of a source pixel's centre to count as on its grid.
OFF_GRID_TOLERANCE = 0.01
# Distinct display colours (RGB), one per segment in turn: what a viewer shows unless told otherwise.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)
# Label names people write for a concept that SNOMED-CT (as pydicom names it) spells otherwise.
SYNONYMS = {
    "tumour": "Tumor",
    "tumor": "Tumor",
    "lesion": "Lesion",
    "vessel": "BloodVessel",
    "cancer": "Neoplasm",
}
# The categories of DICOM's CID 7150, by the context group that holds a property type.
CATEGORY_GROUPS = (
    ("cid7159", "MorphologicallyAbnormalStructure"),  # lesions
    ("cid7166", "Tissue"),  # common tissues
    ("cid7192", "AnatomicalStructure"),  # anatomy
)


def require_highdicom() -> Any:
    """The highdicom module; a ConfigError naming the extra to install when it is missing."""
    try:
        import highdicom
    except ImportError:
        raise ConfigError(
            f"writing DICOM SEG needs highdicom, which is not installed: {INSTALL_HINT}"
        ) from None
    return highdicom


def seglight_version() -> str:
    """The installed seglight's version."""
    try:
        return version("seglight")
    except PackageNotFoundError:
        return "unknown"


def write_dicom_seg(
    mask: np.ndarray,
    affine: np.ndarray,
    series: DicomSeries,
    output: str | Path,
    label_names: Mapping[int, str] | None = None,
    model_name: str = ALGORITHM,
    series_number: int | None = None,
    series_description: str = "seglight segmentation",
) -> Path:
    """Write ``mask`` (label values on ``affine``'s grid, RAS) as a DICOM Segmentation of ``series``; atomically.

    Args:
        mask: ``(X, Y, Z)`` label values, 0 background: a prediction on the series' converted NIfTI grid (or any
            grid covering it; each source pixel takes the nearest voxel).
        affine: the mask's voxel -> RAS mm affine.
        series: the source series (``seglight.data.dicom.find_series``), checked as a volume.
        output: the file to write (``<case>.dcm``).
        label_names: label value -> name; values without a name are called ``label <value>``.
        model_name: what made the mask (the checkpoint's name), as the manufacturer's model name.
        series_number: the new series' number; default: the source's + 1000.
        series_description: the new series' description.
    """
    hd = require_highdicom()
    if series.geometry is None:
        raise DataError(
            f"{series.describe()}: {series.problem or 'not a volume'}; no DICOM SEG can be made for it"
        )
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(
            f"{series.describe()}: the mask has shape {mask.shape}; a DICOM SEG needs a 3D label map"
        )
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) != 0}
    present = sorted(int(v) for v in np.unique(mask) if v != 0)
    if present and present[0] < 0:
        raise DataError(
            f"{series.describe()}: the mask holds the label value {present[0]}; labels are 0 or more"
        )
    values = sorted(set(names) | set(present))
    frames, off_grid = _frames(mask, affine, series)
    if off_grid > OFF_GRID_TOLERANCE:
        log.info(
            "%s: the mask's grid is not the series' (pixels up to %.2f voxels from a voxel centre): nearest voxels",
            series.case_id,
            off_grid,
        )
    lookup = np.zeros(int(max(values, default=0)) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    segments = lookup[frames] if values else np.zeros_like(frames, dtype=np.uint16)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM, family=_codes().cid7162.ArtificialIntelligence, version=seglight_version()
    )
    descriptions = [
        segment_description(number, value, names.get(value, f"label {value}"), algorithm)
        for number, value in enumerate(values, start=1)
    ]
    if not descriptions:  # nothing to describe: one empty segment keeps the object valid and says so
        descriptions = [segment_description(1, 1, "empty", algorithm)]
    headers = list(series.headers)
    number = (
        series_number
        if series_number is not None
        else int(getattr(headers[0], "SeriesNumber", 0) or 0) + 1000
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=segments,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM,
            manufacturer_model_name=model_name[:64],
            software_versions=f"{ALGORITHM} {seglight_version()}",
            device_serial_number=ALGORITHM,
            content_label="SEGLIGHT",
            content_description="automatic segmentation",
            series_description=series_description[:64],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # source headers highdicom cannot use
        raise DataError(
            f"{series.describe()}: highdicom cannot make a DICOM SEG of it ({describe_exception(exc)})"
        ) from None
    with atomic_path(output) as tmp:
        seg.save_as(tmp)
    return Path(output)


def _frames(mask: np.ndarray, affine: np.ndarray, series: DicomSeries) -> tuple[np.ndarray, float]:
    """``(frames, rows, columns)`` label values, one frame per source image in the series' order; and how far off
    the mask's voxel centres the source pixels were (voxels)."""
    out = []
    worst = 0.0
    for header in series.headers:
        frame, off_grid = sample_onto_frame(mask, affine, frame_geometry(header))
        out.append(frame)
        worst = max(worst, off_grid)
    return np.stack(out).astype(np.int64), worst


def segment_description(number: int, value: int, name: str, algorithm: Any) -> Any:
    """One segment: its label name, a SNOMED-CT category and type, a display colour and the algorithm."""
    hd = require_highdicom()
    category, property_type = property_codes(name)
    red, green, blue = PALETTE[(value - 1) % len(PALETTE)]
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64],
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(red, green, blue),
    )


def property_codes(name: str) -> tuple[Any, Any]:
    """(category, type) codes for a label name: SNOMED-CT's concept of that name where there is one (``liver`` ->
    Liver, an anatomical structure), else the generic Tissue / Tissue."""
    codes = _codes()
    for keyword in _keywords(name):
        code = getattr(codes.SCT, keyword, None)
        if code is None:
            continue
        for group, category in CATEGORY_GROUPS:
            members = getattr(codes, group)
            if any(getattr(members, k).value == code.value for k in members.dir("")):
                return getattr(codes.cid7150, category), code
        return codes.cid7150.Tissue, code
    return codes.cid7150.Tissue, codes.SCT.Tissue


def _keywords(name: str) -> list[str]:
    """pydicom's keyword spellings to try for a label name: ``left kidney`` -> LeftKidney, then Kidney."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    if not words:
        return []
    found = ["".join(w[:1].upper() + w[1:].lower() for w in words)]
    if len(words) > 1 and words[0].lower() in ("left", "right"):
        found.append("".join(w[:1].upper() + w[1:].lower() for w in words[1:]))
    synonym = SYNONYMS.get(name.strip().lower())
    return ([synonym] if synonym else []) + found


def _codes() -> Any:
    require_highdicom()
    from pydicom.sr.codedict import codes

    return codes
