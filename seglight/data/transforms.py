"""The transform pipelines: a deterministic prefix (cacheable) and a random suffix (training only)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt
from monai.transforms.utils import map_spatial_axes

from seglight.core.errors import describe_exception
from seglight.core.io import load_nifti, unreadable_nifti

# The size every volume is resized to in resize mode (x, y, z): the reference lab's.
DEFAULT_SPATIAL_SIZE = (128, 128, 64)


class LoadCased(mt.MapTransform):
    """``LoadImaged`` per key, whose failures name the file and the problem instead of a reader's traceback."""

    def __init__(self, keys: Sequence[str], **load_kwargs: Any) -> None:
        super().__init__(keys)
        self.loaders = {key: mt.LoadImaged(keys=key, **load_kwargs) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d = self.loaders[key](d)
            except Exception as exc:
                raise unreadable_nifti(_paths(d[key]), _root_cause(exc)) from exc
        return d


def deterministic_transforms(
    image_key: str = "image",
    label_key: str | None = "label",
    spatial_size: Sequence[int] = DEFAULT_SPATIAL_SIZE,
    a_min: float = -1000.0,
    a_max: float = 1000.0,
    orientation: str | None = "RAS",
    mode: str = "resize",
    target_spacing: Sequence[float] | None = None,
) -> list[mt.Transform]:
    """Load, channel-first, orient, resize (or resample) and window: the same output every time, so it can be cached.

    ``mode="resize"`` (the lab) resizes every volume to ``spatial_size``; ``mode="patch"`` resamples it to
    ``target_spacing`` mm (or keeps its own spacing when that is None) and keeps its extent, for training on
    patches and validating whole volumes. Labels are interpolated nearest-neighbour: trilinear would blur a
    mask into fractional values that are no longer labels.
    """
    keys = [image_key] + ([label_key] if label_key else [])
    steps: list[mt.Transform] = [
        LoadCased(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
    ]
    if orientation:
        steps.append(mt.Orientationd(keys=keys, axcodes=orientation, labels=None))
    if mode == "resize":
        steps.append(
            mt.Resized(
                keys=keys,
                spatial_size=tuple(spatial_size),
                mode=["trilinear"] + (["nearest"] if label_key else []),
            )
        )
    elif target_spacing is not None:
        steps.append(
            mt.Spacingd(
                keys=keys,
                pixdim=tuple(float(s) for s in target_spacing),
                mode=["bilinear"] + (["nearest"] if label_key else []),
            )
        )
    steps.append(
        mt.ScaleIntensityRanged(keys=image_key, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    )
    steps.append(mt.EnsureTyped(keys=keys, dtype="float32", track_meta=True))
    if label_key:
        steps.append(CompactLabeld(keys=label_key))
    return steps


class CompactLabeld(mt.MapTransform):
    """Label maps of whole numbers 0..255 as uint8: a quarter of float32's bytes to cache, flip, collate and move.

    Consumers cast them to float where they need to (``SegModule`` does in its steps). A label with other
    values (fractions, negatives, above 255) stays float32, so the checks report its values as they are.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if isinstance(label, torch.Tensor) and label.is_floating_point() and _fits_uint8(label):
                d[key] = label.to(torch.uint8)
        return d


def _fits_uint8(label: torch.Tensor) -> bool:
    """Whether every value of ``label`` is a whole number 0..255 (an empty label trivially is)."""
    if label.numel() == 0:
        return True
    values = label.as_tensor() if hasattr(label, "as_tensor") else label
    return bool(values.min() >= 0) and bool(values.max() <= 255) and bool((values == values.round()).all())


def random_transforms(
    image_key: str = "image",
    label_key: str = "label",
    flip_prob: float = 0.5,
    mode: str = "resize",
    patch_size: Sequence[int] | None = None,
    num_samples: int = 1,
    pos_neg_ratio: Sequence[float] = (1.0, 1.0),
    class_ratios: Sequence[float] | None = None,
) -> list[mt.Transform]:
    """The training augmentation: the reference random flip along the first axis, after patch sampling in patch mode.

    Patch mode draws ``num_samples`` patches of ``patch_size`` per volume, centred on foreground or background
    voxels at ``pos_neg_ratio`` (``RandCropByPosNegLabeld``; background centres inside the body, image > 0),
    or on each label class at ``class_ratios`` (``RandCropByLabelClassesd``, background first). Volumes are
    padded up to the patch size first, so a rounding voxel after resampling never breaks a crop.
    """
    keys = [image_key, label_key]
    steps: list[mt.Transform] = []
    if mode == "patch":
        if patch_size is None:
            raise ValueError("patch mode needs a patch_size")
        size = tuple(int(s) for s in patch_size)
        steps.append(mt.SpatialPadd(keys=keys, spatial_size=size))
        if class_ratios is not None:
            steps.append(
                mt.RandCropByLabelClassesd(
                    keys=keys,
                    label_key=label_key,
                    spatial_size=size,
                    ratios=[float(r) for r in class_ratios],
                    num_classes=len(class_ratios),
                    num_samples=int(num_samples),
                    warn=False,  # a class missing from one volume is normal; its share goes to the others
                )
            )
        else:
            pos, neg = (float(r) for r in pos_neg_ratio)
            steps.append(
                mt.RandCropByPosNegLabeld(
                    keys=keys,
                    label_key=label_key,
                    spatial_size=size,
                    pos=pos,
                    neg=neg,
                    num_samples=int(num_samples),
                    image_key=image_key,
                    image_threshold=0.0,
                )
            )
    steps.append(RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0))
    return steps


class RandFlipd(mt.RandFlipd):
    """MONAI's ``RandFlipd``, with a fast path for plain tensors (what the training caches serve).

    Same random draw and same flipped arrays; plain tensors skip wrapping each one in a MetaTensor and recording
    the flip in it, which costs twice the flip itself and is thrown away (training items carry no metadata).
    MetaTensors, lazy execution and other inputs take MONAI's own path, so inversion works where it can.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        plain = all(type(d[key]) is torch.Tensor for key in keys)
        if not plain or (self.lazy if lazy is None else lazy):
            return super().__call__(data, lazy=lazy)
        self.randomize(None)
        if self._do_transform:
            for key in keys:
                d[key] = torch.flip(d[key], map_spatial_axes(d[key].ndim, self.flipper.spatial_axis))
        return d


def oriented_geometry(path: str, orientation: str | None = "RAS") -> tuple[list[int], list[float]]:
    """(shape, spacing in mm) of a NIfTI image as the pipeline sees it after reorientation, from its header."""
    from nibabel import orientations as no

    image = load_nifti(path)
    shape = [int(n) for n in image.shape[:3]]
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    if not orientation:
        return shape, zooms
    transform = no.ornt_transform(no.io_orientation(image.affine), no.axcodes2ornt(orientation))
    out_shape, out_spacing = list(shape), list(zooms)
    for axis, (new_axis, _) in enumerate(transform[:3]):
        out_shape[int(new_axis)], out_spacing[int(new_axis)] = shape[axis], zooms[axis]
    return out_shape, out_spacing


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Voxels per axis after resampling to ``target`` spacing (as MONAI's Spacing computes it, corner to corner)."""
    return [
        max(1, round((int(n) - 1) * float(s) / float(t) + 1))
        for n, s, t in zip(shape, spacing, target, strict=True)
    ]


def _paths(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(str(v) for v in value)
    return str(value)


def _root_cause(exc: BaseException) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return describe_exception(cause)
