"""One case's share of the fingerprint: geometry in the training orientation, the non-zero region, intensities
sampled inside the labels, label voxels and connected components. Reads one volume at a time, in a worker thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel import orientations as no
from scipy import ndimage

from seglight.core.errors import DataError
from seglight.core.io import load_nifti, read_array
from seglight.data.checks import label_value_counts
from seglight.data.datalists import IMAGE, LABEL
from seglight.data.transforms import oriented_geometry

# Voxels per case and channel sampled inside the labels (nnU-Net samples 10,000 per case).
FOREGROUND_SAMPLES = 10_000
# Voxels per channel whose percentiles describe the whole image (a strided sample), for the modality guess.
IMAGE_SAMPLES = 200_000
PERCENTILES = (0.5, 50.0, 99.5)
# Connected components per label and case whose sizes are kept (the largest); all are counted.
LARGEST_OBJECTS = 20
# A component this small (voxels) is counted as a speck: label noise rather than an object.
SPECK_VOXELS = 10
CHUNK = 1 << 22  # voxels looked at at a time when sampling (bounded temporaries)


@dataclass
class CaseStats:
    """What the fingerprint keeps of one case; every per-axis list is (x, y, z) in the training orientation."""

    case_id: str
    shape: list[int]
    spacing: list[float]
    cropped_shape: list[int]  # the bounding box of the voxels that are not 0 in any channel
    orientation: str  # the file's own axis codes, before reorientation
    channels: int
    image: list[dict[str, float]]  # per channel: min, max and PERCENTILES of the whole image (sampled)
    label_voxels: dict[int, int]
    objects: dict[
        int, dict[str, Any]
    ]  # label -> components, specks, extents_mm and volumes_mm3 (largest first)
    seconds: float  # reading and computing this case
    samples: list[np.ndarray] = field(default_factory=list, repr=False)  # foreground voxels per channel

    @property
    def kept_fraction(self) -> float:
        """Share of the voxels inside the non-zero region (1.0: cropping removes nothing)."""
        return math.prod(self.cropped_shape) / max(1, math.prod(self.shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the sampled voxels stay out: they are pooled into the channel statistics)."""
        return {
            "case_id": self.case_id,
            "shape": self.shape,
            "spacing": self.spacing,
            "cropped_shape": self.cropped_shape,
            "kept_fraction": round(self.kept_fraction, 4),
            "orientation": self.orientation,
            "channels": self.channels,
            "image": self.image,
            "label_voxels": {str(k): v for k, v in self.label_voxels.items()},
            "objects": {str(k): v for k, v in self.objects.items()},
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseStats:
        """The case as ``to_dict`` wrote it (without its sampled voxels)."""
        return cls(
            case_id=str(data["case_id"]),
            shape=[int(v) for v in data["shape"]],
            spacing=[float(v) for v in data["spacing"]],
            cropped_shape=[int(v) for v in data["cropped_shape"]],
            orientation=str(data["orientation"]),
            channels=int(data["channels"]),
            image=[dict(c) for c in data["image"]],
            label_voxels={int(k): int(v) for k, v in data["label_voxels"].items()},
            objects={int(k): dict(v) for k, v in data["objects"].items()},
            seconds=float(data.get("seconds", 0.0)),
        )


def read_case(
    case: Mapping[str, Any],
    orientation: str | None = "RAS",
    samples: int = FOREGROUND_SAMPLES,
    seed: Sequence[int] = (0,),
) -> CaseStats:
    """Read one case (local files) and describe it; a file that cannot be used is a DataError naming it."""
    started = time.perf_counter()
    image_paths = [str(p) for p in (case[IMAGE] if isinstance(case[IMAGE], list) else [case[IMAGE]])]
    label_path = str(case[LABEL])
    label_image = load_nifti(label_path)
    label = read_array(label_image, label_path)
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    shape, spacing = oriented_geometry(image_paths[0], orientation)
    order = axis_order(label_image.affine, orientation)
    native_spacing = [float(z) for z in label_image.header.get_zooms()[:3]]
    counts, odd = label_value_counts(label)
    if counts is None:
        raise DataError(
            f"{label_path}: has non-integer label values (e.g. {', '.join(f'{v:g}' for v in odd)})"
        )
    rng = np.random.default_rng([*seed])
    positions = foreground_positions(label, samples, rng)
    nonzero = np.zeros(label.shape, dtype=bool)
    image_stats: list[dict[str, float]] = []
    sampled: list[np.ndarray] = []
    for path, volume in _channels(image_paths):
        if tuple(volume.shape) != tuple(label.shape):
            raise DataError(
                f"{path}: shape {list(volume.shape)} differs from its label's {list(label.shape)}"
            )
        flat = volume.reshape(-1, order="F")
        if not _finite(flat):
            raise DataError(f"{path}: has NaN or infinite voxel values; all values must be finite")
        nonzero |= volume != 0
        image_stats.append(_image_statistics(flat))
        sampled.append(flat[positions].astype(np.float32))
        del flat, volume  # one volume at a time
    cropped = _permute(_bounding_box(nonzero), order) if nonzero.any() else [0, 0, 0]
    del nonzero
    objects = {v: _objects(label == v, native_spacing, order) for v in sorted(counts) if v > 0}
    return CaseStats(
        case_id=str(case.get("case_id", "")),
        shape=[int(s) for s in shape],
        spacing=[round(float(s), 5) for s in spacing],
        cropped_shape=cropped,
        orientation="".join(no.aff2axcodes(label_image.affine)),
        channels=len(image_stats),
        image=image_stats,
        label_voxels={int(k): int(v) for k, v in counts.items()},
        objects=objects,
        seconds=time.perf_counter() - started,
        samples=sampled,
    )


def axis_order(affine: np.ndarray, orientation: str | None) -> list[int]:
    """For each axis (x, y, z) after reorientation to ``orientation``, the file's axis it comes from."""
    if not orientation:
        return [0, 1, 2]
    transform = no.ornt_transform(no.io_orientation(affine), no.axcodes2ornt(orientation))
    order = [0, 1, 2]
    for axis, (new_axis, _) in enumerate(transform[:3]):
        order[int(new_axis)] = axis
    return order


def foreground_positions(label: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """About ``samples`` random positions (in Fortran order) of voxels labelled other than 0, chunk by chunk."""
    flat = label.reshape(-1, order="F")
    total = int(np.count_nonzero(flat))
    if total == 0 or samples <= 0:
        return np.zeros(0, dtype=np.int64)
    share = min(1.0, samples / total)
    picks = []
    for start in range(0, flat.size, CHUNK):
        found = np.flatnonzero(flat[start : start + CHUNK])
        if share < 1.0:
            found = found[rng.random(found.size) < share]
        picks.append(found + start)
    return np.concatenate(picks)


def _channels(paths: list[str]) -> Any:
    """(path, one channel's volume) for each channel: one file per channel, or a 4D file's last axis."""
    for path in paths:
        data = read_array(load_nifti(path), path)
        if data.ndim == 4:
            for c in range(data.shape[3]):
                yield path, data[..., c]
        else:
            yield path, data
        del data


def _finite(flat: np.ndarray) -> bool:
    """Whether every value is finite: one float64 sum, and a closer look only when it is not finite."""
    if not np.issubdtype(flat.dtype, np.floating) or math.isfinite(float(np.sum(flat, dtype=np.float64))):
        return True
    return bool(np.isfinite(flat).all())  # finite values whose sum overflows


def _image_statistics(flat: np.ndarray) -> dict[str, float]:
    sample = flat[:: max(1, flat.size // IMAGE_SAMPLES)].astype(np.float64)
    values = np.percentile(sample, PERCENTILES)
    stats = {"min": float(flat.min()), "max": float(flat.max())}
    stats.update({f"p{p:g}": round(float(v), 4) for p, v in zip(PERCENTILES, values, strict=True)})
    return stats


def _bounding_box(mask: np.ndarray) -> list[int]:
    """Voxels per file axis of the smallest box around ``mask``'s true voxels."""
    extents = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        extents.append(int(hits[-1] - hits[0] + 1))
    return extents


def _objects(mask: np.ndarray, spacing: list[float], order: list[int]) -> dict[str, Any]:
    """Connected components (face-connected, scipy.ndimage's default) of one label: count and sizes in mm."""
    components, count = ndimage.label(mask)
    voxels = np.bincount(components.reshape(-1, order="F"))[1:]
    boxes = ndimage.find_objects(components)
    del components
    largest = np.argsort(voxels)[::-1][:LARGEST_OBJECTS]
    voxel_mm3 = float(np.prod(spacing))
    extents = [
        _permute([(boxes[i][a].stop - boxes[i][a].start) * spacing[a] for a in range(3)], order)
        for i in largest
    ]
    return {
        "components": int(count),
        "specks": int(np.count_nonzero(voxels < SPECK_VOXELS)),
        "extents_mm": [[round(float(v), 2) for v in e] for e in extents],
        "volumes_mm3": [round(float(voxels[i]) * voxel_mm3, 2) for i in largest],
    }


def _permute(values: Sequence[Any], order: list[int]) -> list[Any]:
    return [values[order[axis]] for axis in range(3)]
