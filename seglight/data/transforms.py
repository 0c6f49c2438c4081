"""The transform pipelines: a deterministic prefix (cacheable) and a random suffix (training only)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai import transforms as mt

from seglight.errors import DataError


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
                raise DataError(f"{_paths(d[key])}: not a readable NIfTI image ({_root_cause(exc)})") from exc
        return d


def deterministic_transforms(
    image_key: str = "image",
    label_key: str | None = "label",
    spatial_size: Sequence[int] = (128, 128, 64),
    a_min: float = -1000.0,
    a_max: float = 1000.0,
    orientation: str | None = "RAS",
) -> list[mt.Transform]:
    """Load, channel-first, orient, resize and window: the same output every time, so it can be cached.

    Labels are resized with nearest-neighbour interpolation: trilinear would blur a binary mask into
    fractional values that are no longer labels.
    """
    keys = [image_key] + ([label_key] if label_key else [])
    steps: list[mt.Transform] = [
        LoadCased(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
    ]
    if orientation:
        steps.append(mt.Orientationd(keys=keys, axcodes=orientation, labels=None))
    steps.append(
        mt.Resized(
            keys=keys,
            spatial_size=tuple(spatial_size),
            mode=["trilinear"] + (["nearest"] if label_key else []),
        )
    )
    steps.append(
        mt.ScaleIntensityRanged(keys=image_key, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    )
    steps.append(mt.EnsureTyped(keys=keys, dtype="float32", track_meta=True))
    return steps


def random_transforms(
    image_key: str = "image", label_key: str = "label", flip_prob: float = 0.5
) -> list[mt.Transform]:
    """The training augmentation of the reference pipeline: a random flip along the first spatial axis."""
    return [mt.RandFlipd(keys=[image_key, label_key], prob=flip_prob, spatial_axis=0)]


def _paths(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(str(v) for v in value)
    return str(value)


def _root_cause(exc: BaseException) -> str:
    cause: BaseException = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else 'unknown error'}"
