"""The transform pipelines: a deterministic prefix (cacheable) and a random suffix (training only), and the one
description of their transforms that both the disk cache's key and an exported model's JSON are made from."""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms.utils import map_spatial_axes

from seglight.core.errors import describe_exception
from seglight.core.io import load_nifti, unreadable_nifti
from seglight.data.normalization import ClipIntensityd, PerChannelNormalized, normalization_transforms

# The size every volume is resized to in resize mode (x, y, z): the reference lab's.
DEFAULT_SPATIAL_SIZE = (128, 128, 64)


class LoadCased(mt.MapTransform):
    """``LoadImaged`` per key, whose failures name the file and the problem instead of a reader's traceback."""

    def __init__(self, keys: Sequence[str], **load_kwargs: Any) -> None:
        super().__init__(keys)
        # Kept private: the disk cache's key describes the public attributes, and predates this one.
        self._load_kwargs = dict(load_kwargs)
        self.loaders = {key: mt.LoadImaged(keys=key, **load_kwargs) for key in self.keys}

    @property
    def monai_arguments(self) -> dict[str, Any]:
        """The arguments its LoadImaged was made with (``image_only``...), which LoadImaged keeps privately."""
        return dict(self._load_kwargs)

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
    normalize: str | Sequence[str] = "window",
    intensity: Mapping[str, Any] | None = None,
) -> list[mt.Transform]:
    """Load, channel-first, orient, resize (or resample) and normalise: the same output every time, so it can be
    cached.

    ``mode="resize"`` (the lab) resizes every volume to ``spatial_size``; ``mode="patch"`` resamples it to
    ``target_spacing`` mm (or keeps its own spacing when that is None) and keeps its extent, for training on
    patches and validating whole volumes. Labels are interpolated nearest-neighbour: trilinear would blur a
    mask into fractional values that are no longer labels. Intensities are normalised per ``normalize`` and
    ``intensity`` (``seglight.data.normalization``; ``window`` maps ``a_min``..``a_max`` to [0, 1]).
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
    steps += normalization_transforms(image_key, normalize, intensity, a_min=a_min, a_max=a_max)
    steps.append(mt.EnsureTyped(keys=keys, dtype="float32", track_meta=True))
    if label_key:
        steps.append(CompactLabeld(keys=label_key))
    return steps


def pipeline_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """``deterministic_transforms``' settings: those ``saved`` gives (matched by name), the others at its defaults.

    Checkpoints save the data settings by name, so options added to the pipeline later are picked up here.
    """
    parameters = inspect.signature(deterministic_transforms).parameters
    return {name: saved.get(name, p.default) for name, p in parameters.items()}


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
    background_in_body: bool = True,
) -> list[mt.Transform]:
    """The training augmentation: the reference random flip along the first axis, after patch sampling in patch mode.

    Patch mode draws ``num_samples`` patches of ``patch_size`` per volume, centred on foreground or background
    voxels at ``pos_neg_ratio`` (``RandCropByPosNegLabeld``; background centres inside the body, image > 0, when
    ``background_in_body``: windowed images, where air is 0; anywhere otherwise, as z-scored images are below 0
    in much of the body), or on each label class at ``class_ratios`` (``RandCropByLabelClassesd``, background
    first). Volumes are padded up to the patch size first, so a rounding voxel after resampling never breaks a crop.
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
                    image_key=image_key if background_in_body else None,
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


def describe_transform(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's class and public settings, recursively (no addresses, no RNG state).

    The disk cache's key hashes it (an entry is reused only while it is unchanged), and ``describe_steps`` reads
    an exported model's preprocessing from it.
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if depth > 6:
        return type(obj).__qualname__
    if isinstance(obj, enum.Enum):
        return str(obj.value)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list | tuple | set | frozenset):
        items = [describe_transform(x, depth + 1) for x in obj]
        return sorted(items, key=str) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, Mapping):
        return {
            str(k): describe_transform(v, depth + 1) for k, v in obj.items() if not str(k).startswith("_")
        }
    if isinstance(obj, np.ndarray | torch.Tensor):
        array = np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj)
        return array.tolist() if array.size <= 64 else [list(array.shape), str(array.dtype)]
    if isinstance(obj, np.random.RandomState | np.random.Generator | torch.Generator):
        return "rng"
    if isinstance(obj, type | torch.dtype | np.dtype) or not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", None) or str(obj)
    if callable(obj) and not isinstance(obj, mt.Transform) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"  # a function
    attributes = {k: describe_transform(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("_")}
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **attributes}


# What each transform of the pipeline is called in an exported model's JSON, and what it does, in words; the
# settings themselves are read from the transform. Others go by their class name.
STEPS: dict[type, tuple[str, str]] = {
    LoadCased: ("load", "read the scan's NIfTI file (several files of one case are stacked as channels)"),
    mt.EnsureChannelFirstd: ("channel_first", "channels on the first axis"),
    mt.Orientationd: ("orient", "reorient the voxel axes to axcodes"),
    mt.Resized: ("resize", "resize to spatial_size voxels (x, y, z)"),
    mt.Spacingd: ("resample", "resample to pixdim mm per voxel (x, y, z), keeping the scan's extent"),
    mt.ScaleIntensityRanged: ("intensity", "map a_min..a_max linearly to b_min..b_max (clipped when clip)"),
    mt.NormalizeIntensityd: (
        "zscore",
        "subtract subtrahend and divide by divisor, per channel when channel_wise (null: the image's own mean "
        "and standard deviation, over its non-zero voxels when nonzero)",
    ),
    ClipIntensityd: ("clip", "clip each channel to its own low..high (seglight's; MONAI clips to one range)"),
    PerChannelNormalized: ("normalize_per_channel", "each channel through its own normalisation, in order"),
    mt.EnsureTyped: ("dtype", "a tensor of dtype"),
    CompactLabeld: ("compact_label", "labels of whole numbers 0..255 as uint8"),
}
# The MONAI transform a deployment uses where seglight has its own (LoadCased: LoadImaged with clearer errors).
MONAI_EQUIVALENTS: dict[type, type] = {LoadCased: mt.LoadImaged}
# Constructor arguments that say which items a transform applies to or how it runs, not what it does.
_NOT_SETTINGS = {"self", "keys", "allow_missing_keys", "lazy", "args", "kwargs"}


def monai_call(transform: mt.Transform) -> tuple[type, dict[str, Any]]:
    """The MONAI class that does what ``transform`` does, and the arguments of that class it was made with (keys
    aside), read from the object as ``describe_transform`` finds them (a setting MONAI keeps per key, for a
    transform of one key, as that key's value) and from what it declares (``monai_arguments``)."""
    monai_class = MONAI_EQUIVALENTS.get(type(transform), type(transform))
    found = {**_settings(describe_transform(transform)), **getattr(transform, "monai_arguments", {})}
    arguments = inspect.signature(monai_class.__init__).parameters
    return monai_class, {
        name: found[name] for name in arguments if name in found and name not in _NOT_SETTINGS
    }


def describe_steps(transforms: Sequence[mt.Transform]) -> list[dict[str, Any]]:
    """Each transform as a step a deployment can rebuild: its name and purpose (``STEPS``), the MONAI call that does it,
    and that call's arguments (``monai_call``)."""
    steps = []
    for transform in transforms:
        monai_class, settings = monai_call(transform)
        keys = list(getattr(transform, "keys", ()))
        call = [f"keys={keys!r}"] * bool(keys) + [f"{name}={value!r}" for name, value in settings.items()]
        name, what = STEPS.get(type(transform), (type(transform).__name__, None))
        step = {"step": name, **({"what": what} if what else {})}
        steps.append({**step, "monai": f"{monai_class.__name__}({', '.join(call)})", **settings})
    return steps


def _settings(described: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in a transform's description and in those of the transforms it holds (the outer ones win: a
    dictionary transform passes its own to the array transform it wraps), JSON-safe (NaN as null)."""
    one_key = isinstance(described.get("keys"), list) and len(described["keys"]) == 1
    found: dict[str, Any] = {}
    held: list[Mapping[str, Any]] = []
    for name, value in described.items():
        if name == "class":
            continue
        if isinstance(value, Mapping):
            # A transform it holds, or a mapping of them (LoadCased's loader per key).
            held.extend(
                [value] if "class" in value else [v for v in value.values() if isinstance(v, Mapping)]
            )
            continue
        if one_key and name not in _NOT_SETTINGS and isinstance(value, list) and len(value) == 1:
            value = value[0]  # MONAI's per-key tuple
        found[name] = _json_safe(value)
    for inner in held:
        for name, value in _settings(inner).items():
            found.setdefault(name, value)
    return found


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (an unset bound: MONAI's ``[nan]``), MONAI's string enums as str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        items = [_json_safe(v) for v in value]
        return None if items and all(v is None for v in items) else items
    return value


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
