"""Intensity normalisation of the image channels: today's window, z-score per image, and CT's fixed clip + z-score.

The options, as a config (and a plan file, ``python -m seglight.plan``) names them:

- ``data.normalize``: ``window`` (``data.a_min``..``data.a_max`` mapped to [0, 1] and clipped: today's
  behaviour), ``zscore`` (each image channel minus its own mean, over its own standard deviation),
  ``zscore_nonzero`` (the same, over the voxels that are not 0 only; 0 stays 0, as nnU-Net does for MRI whose
  background was cropped or skull-stripped) or ``ct`` (clip to ``data.intensity.low``..``high``, then subtract
  ``data.intensity.mean`` and divide by ``data.intensity.std``: dataset-wide foreground statistics, the same for
  every scan). One mode for every channel, or a list with one mode per channel.
- ``data.intensity``: ``low``, ``high``, ``mean``, ``std``, each a list with one number per channel (``ct``
  channels need all four; other channels' entries are ignored and may be null).

One mode for every channel is built from MONAI's own transforms, so that a MONAI bundle can rebuild it: CT's clip
is ``ScaleIntensityRanged`` from low..high onto itself (clipped), its z-score ``NormalizeIntensityd`` with the
given mean and std. Only clip ranges that differ between channels, and a mode per channel, need seglight's
``ClipIntensityd`` and ``PerChannelNormalized`` (``SEGLIGHT_ONLY``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt

from seglight.core.errors import ConfigError

NORMALIZE_MODES = ("window", "zscore", "zscore_nonzero", "ct")
INTENSITY_KEYS = ("low", "high", "mean", "std")
NORMALIZE_OPTION = "data.normalize"
INTENSITY_OPTION = "data.intensity"


def channel_count(normalize: str | Sequence[str], intensity: Mapping[str, Any] | None = None) -> int:
    """The channels the settings are for: a list of modes has one per channel, else the longest intensity list
    (1 when nothing says)."""
    if not isinstance(normalize, str):
        return len(list(normalize))
    lengths = [
        len(v) for v in (intensity or {}).values() if isinstance(v, Sequence) and not isinstance(v, str)
    ]
    return max(lengths, default=1)


def normalize_modes(normalize: str | Sequence[str], channels: int) -> list[str]:
    """One mode per channel from ``data.normalize`` (a mode, or a list with one per channel), checked."""
    modes = [normalize] * channels if isinstance(normalize, str) else [str(m) for m in normalize]
    if len(modes) != channels:
        raise ConfigError(
            f"{NORMALIZE_OPTION} lists {len(modes)} modes but the images have {channels} channel(s): give one "
            f"mode for all ({'|'.join(NORMALIZE_MODES)}) or one per channel"
        )
    unknown = [m for m in modes if m not in NORMALIZE_MODES]
    if unknown:
        raise ConfigError(
            f"{NORMALIZE_OPTION}={unknown[0]!r} is not a normalisation; use one of {', '.join(NORMALIZE_MODES)}"
        )
    return modes


def intensity_settings(
    intensity: Mapping[str, Any] | None, modes: Sequence[str]
) -> dict[str, list[float | None]]:
    """``data.intensity`` as one list per key with one entry per channel, checked for the ``ct`` channels."""
    given = dict(intensity or {})
    unknown = sorted(set(given) - set(INTENSITY_KEYS))
    if unknown:
        raise ConfigError(
            f"{INTENSITY_OPTION}.{unknown[0]}: not an intensity setting (they are {', '.join(INTENSITY_KEYS)})"
        )
    settings: dict[str, list[float | None]] = {}
    for key in INTENSITY_KEYS:
        values = given.get(key)
        if values is None:
            values = [None] * len(modes)
        elif not isinstance(values, Sequence) or isinstance(values, str):
            values = [values] * len(modes)
        values = [None if v is None else float(v) for v in values]
        if len(values) != len(modes):
            raise ConfigError(
                f"{INTENSITY_OPTION}.{key} has {len(values)} value(s) but the images have {len(modes)} "
                "channel(s): give one per channel"
            )
        settings[key] = values
    for channel, mode in enumerate(modes):
        if mode != "ct":
            continue
        missing = [key for key in INTENSITY_KEYS if settings[key][channel] is None]
        if missing:
            raise ConfigError(
                f"{NORMALIZE_OPTION}=ct needs {INTENSITY_OPTION}.{missing[0]} for channel {channel} (the "
                "dataset's foreground statistics; python -m seglight.plan computes them)"
            )
        low, high, std = (settings[k][channel] for k in ("low", "high", "std"))
        if high <= low or std <= 0:  # type: ignore[operator]
            raise ConfigError(
                f"{INTENSITY_OPTION} for channel {channel}: need low < high and std > 0, got low={low}, "
                f"high={high}, std={std}"
            )
    return settings


def normalization_transforms(
    key: str,
    normalize: str | Sequence[str] = "window",
    intensity: Mapping[str, Any] | None = None,
    channels: int | None = None,
    a_min: float = -1000.0,
    a_max: float = 1000.0,
) -> list[mt.Transform]:
    """The transforms that normalise the image under ``key`` (channel first), per ``data.normalize``.

    One mode for every channel uses MONAI's transforms as they are (``ScaleIntensityRanged``,
    ``NormalizeIntensityd``; CT's clip is ``ScaleIntensityRanged`` onto the same range, or ``ClipIntensityd`` when
    the channels' ranges differ); a mode per channel runs each channel's own through ``PerChannelNormalized``.
    ``channels``: None takes them from the settings (``channel_count``).
    """
    channels = channel_count(normalize, intensity) if channels is None else channels
    modes = normalize_modes(normalize, channels)
    settings = intensity_settings(intensity, modes)
    if len(set(modes)) == 1:
        mode = modes[0]
        if mode == "window":
            return [
                mt.ScaleIntensityRanged(keys=key, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
            ]
        if mode in ("zscore", "zscore_nonzero"):
            return [mt.NormalizeIntensityd(keys=key, nonzero=mode == "zscore_nonzero", channel_wise=True)]
        return [
            _clip(key, settings["low"], settings["high"]),
            mt.NormalizeIntensityd(
                keys=key, subtrahend=settings["mean"], divisor=settings["std"], channel_wise=True
            ),
        ]
    steps = [_channel_transform(mode, settings, c, a_min, a_max) for c, mode in enumerate(modes)]
    return [PerChannelNormalized(keys=key, transforms=steps)]


def _clip(key: str, low: Sequence[float | None], high: Sequence[float | None]) -> mt.Transform:
    """Clip every channel: MONAI's ``ScaleIntensityRanged`` from low..high onto itself when the channels share one
    range (a bundle can rebuild it), else each channel to its own (``ClipIntensityd``)."""
    if len(set(low)) == 1 and len(set(high)) == 1:
        bottom, top = float(low[0]), float(high[0])  # type: ignore[arg-type]
        return mt.ScaleIntensityRanged(keys=key, a_min=bottom, a_max=top, b_min=bottom, b_max=top, clip=True)
    return ClipIntensityd(keys=key, low=low, high=high)


def value_range(
    normalize: str | Sequence[str], intensity: Mapping[str, Any] | None = None
) -> list[float] | None:
    """The range of the network's input values after normalisation: [0, 1] for ``window``; ``ct``'s clip range
    z-scored; None when unbounded (``zscore`` per image)."""
    modes = normalize_modes(normalize, channel_count(normalize, intensity))
    if set(modes) == {"window"}:
        return [0.0, 1.0]
    if set(modes) != {"ct"}:
        return None
    settings = intensity_settings(intensity, modes)
    low, high, mean, std = (settings[k] for k in INTENSITY_KEYS)
    bottoms = [(lo - m) / s for lo, m, s in zip(low, mean, std, strict=True)]  # type: ignore[operator]
    tops = [(hi - m) / s for hi, m, s in zip(high, mean, std, strict=True)]  # type: ignore[operator]
    return [round(min(bottoms), 6), round(max(tops), 6)]


def describe_normalization(normalize: str | Sequence[str], a_min: float, a_max: float) -> str:
    """What the normalisation does to intensities, in words (a MONAI bundle's description)."""
    modes = [normalize] if isinstance(normalize, str) else list(normalize)
    if set(modes) == {"window"}:
        return f"intensities {a_min:g}..{a_max:g} windowed to 0..1"
    words = {
        "window": f"windowed from {a_min:g}..{a_max:g} to 0..1",
        "zscore": "z-scored per image (its own mean and standard deviation)",
        "zscore_nonzero": "z-scored per image over its non-zero voxels (zeros stay 0)",
        "ct": "clipped to data.intensity low..high, then z-scored with its mean and std",
    }
    if len(set(modes)) == 1:
        return f"intensities {words[modes[0]]}"
    return "intensities " + "; ".join(f"channel {c} {words[m]}" for c, m in enumerate(modes))


def _channel_transform(
    mode: str, settings: Mapping[str, list[float | None]], channel: int, a_min: float, a_max: float
) -> mt.Transform:
    """The array transform of one channel (``(1, x, y, z)``)."""
    if mode == "window":
        return mt.ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    if mode in ("zscore", "zscore_nonzero"):
        return mt.NormalizeIntensity(nonzero=mode == "zscore_nonzero")
    low, high, mean, std = (settings[k][channel] for k in INTENSITY_KEYS)
    return mt.Compose([ClipIntensity([low], [high]), mt.NormalizeIntensity(subtrahend=mean, divisor=std)])


class ClipIntensity(mt.Transform):
    """Clip each channel of a channel-first image to its own ``[low, high]`` (MONAI clips to one range only).

    Args:
        low, high: one bound per channel.
    """

    def __init__(self, low: Sequence[float | None], high: Sequence[float | None]) -> None:
        self.low = [float(v) for v in low if v is not None]
        self.high = [float(v) for v in high if v is not None]
        if len(self.low) != len(low) or len(self.high) != len(high):
            raise ValueError("ClipIntensity needs a low and a high bound for every channel")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != len(self.low):
            raise ValueError(f"{len(self.low)} clip ranges for an image of {image.shape[0]} channel(s)")
        shape = (-1,) + (1,) * (image.ndim - 1)
        image = torch.as_tensor(image)
        if not image.is_floating_point():
            image = image.float()
        low = torch.tensor(self.low, dtype=image.dtype, device=image.device).reshape(shape)
        high = torch.tensor(self.high, dtype=image.dtype, device=image.device).reshape(shape)
        return torch.maximum(torch.minimum(image, high), low)


class ClipIntensityd(mt.MapTransform):
    """``ClipIntensity`` on the images under ``keys``.

    Args:
        keys: the image keys.
        low, high: one bound per channel.
    """

    def __init__(self, keys: Any, low: Sequence[float | None], high: Sequence[float | None]) -> None:
        super().__init__(keys)
        self.clip = ClipIntensity(low, high)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clip(d[key])
        return d


class PerChannelNormalized(mt.MapTransform):
    """Each channel of the images under ``keys`` through its own array transform (one mode per channel).

    Args:
        keys: the image keys.
        transforms: one array transform per channel, each taking and returning a ``(1, x, y, z)`` image.
    """

    def __init__(self, keys: Any, transforms: Sequence[mt.Transform]) -> None:
        super().__init__(keys)
        self.transforms = list(transforms)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.transforms):
                raise ValueError(f"{len(self.transforms)} channel transforms for {image.shape[0]} channel(s)")
            # Slices and results of MONAI's transforms stay MetaTensors, and torch.cat keeps the first one's
            # metadata: the affine survives for the transforms after this one.
            d[key] = torch.cat([t(image[c : c + 1]).float() for c, t in enumerate(self.transforms)])
        return d


# seglight's own transforms among these: a MONAI bundle, which runs with MONAI alone, cannot rebuild them.
SEGLIGHT_ONLY = (ClipIntensityd, PerChannelNormalized)
