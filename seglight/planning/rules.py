"""The planning rules, nnU-Net v2's where it has one: pure functions from a fingerprint (and the network, a memory
test, measured times) to decisions, each with its value, its rule and the numbers behind it.

Every per-axis list is (x, y, z). Sizes are in voxels at the planned spacing; ``fits(size, batch)`` is whatever
memory test the caller has (a measurement on a GPU, an estimate elsewhere: see ``seglight.planning.memory``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seglight.core.errors import ConfigError
from seglight.data.transforms import resampled_shape
from seglight.models.networks import (
    AUTO,
    check_input_size,
    class_name,
    dynunet_kernels_strides,
    size_divisors,
)
from seglight.planning.fingerprint import AXES, Fingerprint, is_ct

# nnU-Net's start: a patch of 256^3 voxels, shaped like the physical extent (proportional to 1/spacing).
START_VOLUME = 256**3
# An axis this many times coarser than the finest is anisotropic (nnU-Net's threshold, for spacing and voxels).
ANISOTROPY = 3.0
MIN_BATCH = 2  # nnU-Net's smallest batch
MAX_DATASET_SHARE = 0.05  # a batch covers at most this share of the dataset's voxels (nnU-Net)
# Shapes or spacings vary when the 95th percentile over cases exceeds the 5th by more than this factor.
SPREAD = 1.25
MAX_BATCH_SEARCH = 256  # the batch search stops here whatever the memory
MAX_FILTERS = 320  # DynUNet's filters are doubled per stage up to this (nnU-Net)
MIN_AXIS = 8  # no patch axis is shrunk below this (nnU-Net pools an axis only from 8 voxels on)


@dataclass(frozen=True)
class Decision:
    """One decision of a plan: what was decided, by which rule, from which numbers, as config overrides.

    ``kept`` is None for a decision made from the data, True when a value the user gave was kept.
    """

    name: str
    value: Any
    rule: str
    numbers: str
    overrides: dict[str, Any] = field(default_factory=dict)
    kept: bool | None = None


def axes(values: Sequence[Any], fmt: str = "g") -> str:
    """``x 0.8, y 0.8, z 2.5``."""
    return ", ".join(f"{a} {format(v, fmt)}" for a, v in zip(AXES, values, strict=True))


# -- modality and spacing ----------------------------------------------------------------------------------


def decide_modalities(fingerprint: Fingerprint, given: Sequence[str] | None) -> tuple[list[str], Decision]:
    """Per channel: ``plan.modality`` when given (kept), else dataset.json's, else the guess from intensities."""
    found = [c.modality for c in fingerprint.channels]
    sources = "; ".join(f"channel {c.index}: {c.modality} ({c.source})" for c in fingerprint.channels)
    if given is None:
        return found, Decision(
            "modality", found, "dataset.json's modality or channel_names, else a guess", sources
        )
    chosen = [str(m) for m in given]
    if len(chosen) != len(found):
        raise ConfigError(
            f"plan.modality={chosen} names {len(chosen)} channel(s) but the images have {len(found)}: give one "
            "modality per channel, e.g. plan.modality=[CT]"
        )
    differ = [i for i, (a, b) in enumerate(zip(chosen, found, strict=True)) if is_ct(a) != is_ct(b)]
    note = f"kept plan.modality; the data says {sources}"
    if differ:
        note += f" (channel {differ[0]} disagrees: its normalisation follows plan.modality)"
    return chosen, Decision("modality", chosen, "plan.modality, as given", note, kept=True)


def decide_spacing(fingerprint: Fingerprint, given: Sequence[float] | None) -> tuple[list[float], Decision]:
    """Target spacing: per-axis median; an axis > 3x coarser than the others (with < 1/3 of their voxels) gets
    its 10th percentile instead (nnU-Net). ``plan.target_spacing`` (the deployment spacing) is kept."""
    spacings, shapes = fingerprint.spacings(), fingerprint.shapes()
    median = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    target = median.copy()
    worst = int(np.argmax(median))
    others = [a for a in range(3) if a != worst]
    coarse = median[worst] > ANISOTROPY * max(median[others])
    few = median_shape[worst] * ANISOTROPY < min(median_shape[others])
    numbers = f"median {axes(np.round(median, 4))} mm"
    rule = "per-axis median spacing"
    if coarse and few:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, max(median[others]))
        rule += f"; the {AXES[worst]} axis is > {ANISOTROPY:g}x coarser with < 1/{ANISOTROPY:g} of the voxels: its 10th percentile"
        numbers += f"; {AXES[worst]}: {median[worst]:.4g} mm is {median[worst] / max(median[others]):.3g}x the others, {median_shape[worst]:g} voxels vs {min(median_shape[others]):g}; p10 {p10:.4g} mm"
    elif coarse:
        numbers += f"; {AXES[worst]} is {median[worst] / max(median[others]):.3g}x coarser but has {median_shape[worst]:g} voxels (>= 1/{ANISOTROPY:g} of {min(median_shape[others]):g}): median kept"
    data_target = [round(float(v), 4) for v in target]
    if given is None:
        return data_target, Decision("target spacing", data_target, rule, numbers)
    kept = [float(v) for v in given]
    if len(kept) != 3 or min(kept) <= 0:
        raise ConfigError(
            f"plan.target_spacing must be three positive spacings in mm (x, y, z), got {list(given)}"
        )
    return kept, Decision(
        "target spacing",
        kept,
        "plan.target_spacing (the deployment spacing), as given",
        f"kept; the data's rule would give {axes(data_target)} mm ({rule}: {numbers})",
        kept=True,
    )


def shapes_at(fingerprint: Fingerprint, spacing: Sequence[float]) -> np.ndarray:
    """``(cases, 3)`` shapes after resampling to ``spacing`` (whole volumes: seglight does not crop)."""
    return np.array(
        [resampled_shape(c.shape, c.spacing, spacing) for c in fingerprint.cases], dtype=np.int64
    ).reshape(-1, 3)


def spread(values: np.ndarray) -> np.ndarray:
    """Per axis: 95th over 5th percentile across cases (1.0: all alike)."""
    low = np.maximum(np.percentile(values, 5, axis=0), 1e-9)
    return np.percentile(values, 95, axis=0) / low


# -- sizes the network accepts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSizes:
    """The input sizes a network accepts, from ``seglight.models.networks`` (``size_divisors``, and for DynUNet
    with ``auto`` strides nnU-Net's pooling rule ``dynunet_kernels_strides``)."""

    model: Mapping[str, Any]
    spacing: tuple[float, ...]

    @property
    def planned_dynunet(self) -> bool:
        """DynUNet whose kernels and strides follow the size (``auto``)."""
        return class_name(self.model) == "DynUNet" and AUTO in (
            self.model.get("strides"),
            self.model.get("kernel_size"),
        )

    def divisors(self, size: Sequence[int]) -> list[int]:
        """Per axis, what ``size`` should be a multiple of. DynUNet: 2^(poolings nnU-Net's rule allows at the
        largest power of two within ``size``), so that rounding keeps every pooling."""
        if self.planned_dynunet:
            virtual = [2 ** int(math.log2(max(1, int(s)))) for s in size]
            _, strides = dynunet_kernels_strides(virtual, self.spacing)
            return [int(np.prod([s[a] for s in strides])) for a in range(3)]
        return size_divisors(self.model, 3) or [1, 1, 1]

    def round_down(self, size: Sequence[int]) -> list[int] | None:
        """The largest accepted size within ``size`` (None if an axis is below its divisor)."""
        divisors = self.divisors(size)
        rounded = [int(s) // d * d for s, d in zip(size, divisors, strict=True)]
        return rounded if min(rounded) > 0 else None

    def round_nearest(self, size: Sequence[int]) -> list[int]:
        """The accepted size nearest to ``size`` (at least one divisor per axis)."""
        divisors = self.divisors(size)
        return [max(d, int(math.floor(s / d + 0.5)) * d) for s, d in zip(size, divisors, strict=True)]

    def accepts(self, size: Sequence[int]) -> bool:
        """Whether the network takes ``size`` (``check_input_size``: divisibility, SwinUNETR's bottleneck)."""
        try:
            check_input_size(self.model, size, "size")
        except ConfigError:
            return False
        return True

    def rule(self, size: Sequence[int]) -> str:
        """Why ``size`` is accepted, in words."""
        divisors = self.divisors(size)
        name = class_name(self.model) or "the network"
        if self.planned_dynunet:
            return f"DynUNet: multiples of 2^poolings per axis ({axes(divisors)})"
        if divisors == [1, 1, 1]:
            return f"{name}: any size"
        return f"{name}: multiples of {axes(divisors)}"


def initial_size(
    spacing: Sequence[float], median: Sequence[float], limit: Sequence[float]
) -> tuple[list[int], str]:
    """nnU-Net's start: proportional to 1/spacing at ``START_VOLUME`` voxels, clipped to the median shape, and
    (seglight refuses patches larger than a volume) to the smallest volume."""
    inverse = 1.0 / np.asarray(spacing, dtype=np.float64)
    start = np.round(inverse * (START_VOLUME / np.prod(inverse)) ** (1 / 3)).astype(int)
    clipped = np.minimum(np.minimum(start, np.floor(median)), np.floor(limit)).astype(int)
    numbers = (
        f"start {axes(start)} (256^3 voxels shaped as 1/spacing), median shape {axes(np.round(median, 1))}, "
        f"smallest volume {axes(np.asarray(limit, int))}"
    )
    return [int(v) for v in clipped], numbers


def candidate_sizes(start: Sequence[int], median: Sequence[float], sizes: NetworkSizes) -> list[list[int]]:
    """Accepted sizes, largest first: ``start`` rounded down, then shrunk one divisor at a time along the axis
    whose size is the largest share of the median shape (nnU-Net's order), no axis below ``MIN_AXIS`` voxels
    (or its start, when the volumes are thinner); only sizes ``check_input_size`` accepts."""
    current = sizes.round_down(start)
    candidates: list[list[int]] = []
    while current is not None and current not in candidates:
        candidates.append(current)
        divisors = sizes.divisors(current)
        ratios = [
            c / max(m, 1.0) if c - d >= max(d, MIN_AXIS) else -1.0
            for c, m, d in zip(current, median, divisors, strict=True)
        ]
        axis = int(np.argmax(ratios))
        if ratios[axis] < 0:
            break  # no axis can lose a divisor and keep MIN_AXIS voxels
        smaller = list(current)
        smaller[axis] -= divisors[axis]
        current = sizes.round_down(smaller)
    return [c for c in candidates if sizes.accepts(c)]


# -- memory: the largest size, then the largest batch ---------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """The outcome of the memory search."""

    size: list[int]
    batch: int  # patches (resize mode: volumes) per training step
    fits: bool  # False: even the smallest candidate at MIN_BATCH is over the budget
    largest_batch: int  # the largest batch that fits at ``size``, up to ``searched_to``
    searched_to: (
        int  # the batch search's limit: the dataset cap (at least MIN_BATCH), at most MAX_BATCH_SEARCH
    )
    batch_cap: int  # MAX_DATASET_SHARE of the dataset's voxels, in batches of ``size``
    tried: int  # memory tests run


def fit_size_and_batch(
    candidates: Sequence[Sequence[int]],
    fits: Callable[[Sequence[int], int], bool],
    dataset_voxels: float,
) -> Fit:
    """The first (largest) candidate that fits at ``MIN_BATCH``, found by bisection (memory grows with size);
    then the largest batch that fits, doubling then bisecting, capped at ``MAX_DATASET_SHARE`` of the dataset's
    voxels but never below ``MIN_BATCH``."""
    tried = 0

    def test(size: Sequence[int], batch: int) -> bool:
        nonlocal tried
        tried += 1
        return fits(size, batch)

    low, high = 0, len(candidates) - 1
    if not test(candidates[high], MIN_BATCH):
        size = list(candidates[high])
        cap = _batch_cap(dataset_voxels, size)
        return Fit(size, MIN_BATCH, False, 0, MIN_BATCH, cap, tried)
    while low < high:  # candidates[high] fits; find the first that does
        middle = (low + high) // 2
        if test(candidates[middle], MIN_BATCH):
            high = middle
        else:
            low = middle + 1
    size = list(candidates[high])
    cap = _batch_cap(dataset_voxels, size)
    limit = min(max(cap, MIN_BATCH), MAX_BATCH_SEARCH)
    good, bad = MIN_BATCH, None
    while bad is None and good < limit:
        trial = min(good * 2, limit)
        if test(size, trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if test(size, middle):
            good = middle
        else:
            bad = middle
    return Fit(size, max(MIN_BATCH, min(good, cap)), True, good, limit, cap, tried)


def _batch_cap(dataset_voxels: float, size: Sequence[int]) -> int:
    return int(round(MAX_DATASET_SHARE * dataset_voxels / max(1, math.prod(size))))


def split_batch(patches: int, num_samples: int) -> tuple[int, int]:
    """(data.batch_size, data.patch.num_samples) for ``patches`` per step: as many patches per case as the
    config asks, but from at least two cases, with a whole number of cases."""
    samples = max(1, min(int(num_samples), patches // MIN_BATCH))
    while patches % samples:
        samples -= 1
    return patches // samples, samples


# -- network ----------------------------------------------------------------------------------------------------


def network_overrides(
    model: Mapping[str, Any], size: Sequence[int], spacing: Sequence[float]
) -> dict[str, Any]:
    """Model settings a candidate size needs besides the config's: DynUNet's ``filters`` list, one per stage,
    cut to the stages the size gets or extended by doubling (at most ``MAX_FILTERS``, nnU-Net's cap)."""
    filters = model.get("filters")
    if not NetworkSizes(model, tuple(spacing)).planned_dynunet or not isinstance(filters, Sequence):
        return {}
    stages = len(dynunet_kernels_strides(size, spacing)[1])
    adapted = [int(f) for f in filters][:stages]
    while len(adapted) < stages:
        adapted.append(min(MAX_FILTERS, 2 * adapted[-1]))
    return {} if adapted == [int(f) for f in filters] else {"filters": adapted}


def decide_network(
    model: Mapping[str, Any], size: Sequence[int], spacing: Sequence[float], option: str
) -> Decision:
    """DynUNet: kernels and strides per axis by nnU-Net's rule (pool an axis while it has >= 8 voxels and its
    spacing is within 2x of the finest; 1-voxel kernels on much coarser axes). Others: the size they accept."""
    sizes = NetworkSizes(model, tuple(spacing))
    if not sizes.planned_dynunet:
        divisors = size_divisors(model, 3)
        numbers = f"{option}={list(size)}" + (f" (multiples of {axes(divisors)})" if divisors else "")
        return Decision("network", class_name(model), sizes.rule(size), numbers)
    kernels, strides = dynunet_kernels_strides(size, spacing)
    stages = "; ".join(
        f"stage {i}: kernel {axes(k)}, stride {axes(s)}"
        for i, (k, s) in enumerate(zip(kernels, strides, strict=True))
    )
    overrides: dict[str, Any] = {
        "model.kernel_size": kernels,
        "model.strides": strides,
        "model.upsample_kernel_size": strides[1:],
    }
    note = ""
    adapted = network_overrides(model, size, spacing)
    if adapted:
        overrides.update({f"model.{k}": v for k, v in adapted.items()})
        note = f"; model.filters {list(model['filters'])} follows the {len(strides)} stages: {adapted['filters']}"
    return Decision(
        "network",
        {"kernel_size": kernels, "strides": strides},
        "nnU-Net's pooling: halve an axis while it has >= 8 voxels and its spacing is within 2x of the finest; "
        "kernel 1 along axes more than 2x coarser",
        f"{option}={list(size)} at {axes(spacing)} mm: {stages}{note}",
        overrides,
    )


# -- mode, size and batch ---------------------------------------------------------------------------------------


def decide_mode(
    shapes: np.ndarray,
    spacing: Sequence[float],
    whole: Sequence[int],
    whole_fits: bool | None,
    spacing_given: bool,
) -> Decision:
    """Resize when the volumes are small and alike: the whole median volume fits as one input (at
    ``MIN_BATCH``), shapes at the target spacing vary by at most ``SPREAD``, spacing not anisotropic and no
    deployment spacing to keep. Patch otherwise (large, anisotropic, or varying volumes). ``whole_fits`` is None
    when the memory test was not needed (another reason already chose patch mode)."""
    median = np.median(shapes, axis=0)
    spreads = spread(shapes)
    ratio = max(spacing) / min(spacing)
    reasons = []
    if spacing_given:
        reasons.append("plan.target_spacing is given (resize mode does not keep a spacing)")
    if max(spreads) > SPREAD:
        reasons.append(f"shapes vary: 95th/5th percentile {axes(np.round(spreads, 2))} (> {SPREAD:g})")
    if ratio > ANISOTROPY:
        reasons.append(
            f"anisotropic: {ratio:.3g}x between the coarsest and finest spacing (> {ANISOTROPY:g})"
        )
    if math.prod(median) > START_VOLUME:
        reasons.append(f"large: the median volume has {math.prod(median):,.0f} voxels (> 256^3)")
    elif whole_fits is False:
        reasons.append(
            f"large: the whole median volume ({list(whole)}) at batch {MIN_BATCH} is over the budget"
        )
    shape_text = (
        f"median shape {axes(np.round(median))} at the target spacing, spread {axes(np.round(spreads, 2))}"
    )
    if reasons:
        return Decision(
            "mode",
            "patch",
            "patch when volumes are large, anisotropic or vary in shape; resize when small and alike",
            f"{'; '.join(reasons)}; {shape_text}",
            {"data.mode": "patch"},
        )
    return Decision(
        "mode",
        "resize",
        "resize when volumes are small and alike (the whole volume fits; shapes within the spread; isotropic enough)",
        f"{shape_text}; anisotropy {ratio:.3g}x; the whole median volume {list(whole)} fits at batch {MIN_BATCH}",
        {"data.mode": "resize"},
    )


def decide_size(
    mode: str, fit: Fit, spacing: Sequence[float], start_numbers: str, rule: str, use: str
) -> Decision:
    """The input size the memory search settled on, as ``data.patch.size`` or ``data.spatial_size``."""
    if mode == "patch":
        overrides = {"data.patch.size": fit.size, "data.patch.target_spacing": [float(s) for s in spacing]}
        how = (
            "start at 256^3 voxels shaped as 1/spacing, clip to the median (and smallest) volume, round to the "
            "sizes the network accepts, shrink the axis with the largest size/median ratio until it fits"
        )
        name = "patch size"
    else:
        overrides = {"data.spatial_size": fit.size}
        how = "the median volume at the target spacing, rounded to the sizes the network accepts, shrunk until it fits"
        name = "input size"
    numbers = f"{start_numbers}; {rule}; {use}; {fit.tried} memory test(s)"
    return Decision(name, fit.size, how, numbers, overrides)


def decide_batch(mode: str, fit: Fit, num_samples: int) -> Decision:
    """The batch: what fits, at least ``MIN_BATCH``, at most ``MAX_DATASET_SHARE`` of the dataset's voxels
    (nnU-Net); in patch mode split into cases x patches per case."""
    searched = "all tested fit" if fit.largest_batch >= fit.searched_to else "more does not fit"
    numbers = (
        f"{MAX_DATASET_SHARE:.0%} of the dataset's voxels is {fit.batch_cap} input(s) of {fit.size}; memory "
        f"allows {fit.largest_batch} (tested up to {fit.searched_to}: {searched})"
    )
    if not fit.fits:
        numbers = f"even batch {MIN_BATCH} is over the memory budget; {numbers}"
    rule = f"what fits, at least {MIN_BATCH}, at most {MAX_DATASET_SHARE:.0%} of the dataset's voxels"
    if mode != "patch":
        return Decision("batch", fit.batch, rule, numbers, {"data.batch_size": fit.batch})
    cases, samples = split_batch(fit.batch, num_samples)
    return Decision(
        "batch",
        {"patches": fit.batch, "batch_size": cases, "num_samples": samples},
        f"{rule}; patches per step = data.batch_size cases x data.patch.num_samples patches each (from >= 2 cases)",
        numbers,
        {"data.batch_size": cases, "data.patch.num_samples": samples},
    )
