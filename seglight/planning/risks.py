"""What a person should know before spending a day of GPU time on a plan: each a sentence with its numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from seglight.planning.fingerprint import AXES, CT_AIR_BELOW, Fingerprint, is_ct
from seglight.planning.rules import ANISOTROPY, SPREAD, axes, spread
from seglight.planning.schedule import MIN_EPOCHS

# An object fewer voxels across than this at the planned spacing is hard to segment.
FEW_VOXELS = 3
# The patch should cover at least this share of the median volume (nnU-Net plans a low-resolution stage below).
MIN_PATCH_COVERAGE = 0.25
# Logits, probabilities and one-hot targets of all classes should take at most this share of the budget.
CLASS_MEMORY_SHARE = 0.25


def plan_risks(
    fingerprint: Fingerprint,
    *,
    spacing: Sequence[float],
    mode: str,
    size: Sequence[int],
    batch: int,
    median_shape: Sequence[float],
    modalities: Sequence[str],
    network: str,
    classes: int,
    usable_bytes: float,
    fits: bool,
    epochs: int | None = None,
) -> list[str]:
    """The warnings of a plan, most serious first."""
    found: list[str] = []
    if not fits:
        found.append(
            f"even {mode} size {list(size)} at batch {batch} does not fit the memory budget: use a larger "
            "plan.gpu_memory_gb, compute.checkpointing=true, a smaller network, or a coarser plan.target_spacing"
        )
    found += _geometry(fingerprint, spacing, network)
    found += _objects(fingerprint, spacing, mode, size)
    found += _modalities(fingerprint, modalities)
    coverage = math.prod(size) / max(1.0, math.prod(median_shape))
    if mode == "patch" and coverage < MIN_PATCH_COVERAGE:
        found.append(
            f"the patch covers {coverage:.0%} of the median volume ({list(size)} of {axes(np.round(median_shape))}): "
            "nnU-Net would add a low-resolution stage; seglight has none, so consider a coarser "
            "plan.target_spacing if context matters"
        )
    logits = 3 * max(classes, 1) * math.prod(size) * batch * 4
    if classes > 2 and usable_bytes > 0 and logits > CLASS_MEMORY_SHARE * usable_bytes:
        found.append(
            f"{classes} classes: logits, probabilities and one-hot targets take {logits / 2**30:.1f} GiB per step, "
            f"over {CLASS_MEMORY_SHARE:.0%} of the budget; the plan's patch and batch are small for so many classes"
        )
    if epochs is not None and epochs < MIN_EPOCHS:
        found.append(f"the time budget allows only {epochs} epoch(s): expect an undertrained model")
    return found


def _geometry(fingerprint: Fingerprint, spacing: Sequence[float], network: str) -> list[str]:
    found = []
    spacings = fingerprint.spacings()
    spreads = spread(spacings)
    for axis, value in enumerate(spreads):
        if value > SPREAD:
            low, high = np.percentile(spacings[:, axis], [5, 95])
            found.append(
                f"mixed spacings along {AXES[axis]}: {low:.3g} to {high:.3g} mm (5th to 95th percentile over cases); "
                f"every case is resampled to {spacing[axis]:.3g} mm, so thick-slice cases are interpolated"
            )
    ratio = max(spacing) / min(spacing)
    if ratio > ANISOTROPY:
        coarse = AXES[int(np.argmax(spacing))]
        advice = (
            "DynUNet plans 1-voxel kernels along it"
            if network == "DynUNet"
            else "model=dynunet plans 1-voxel kernels and fewer poolings along it"
        )
        found.append(f"strong anisotropy: {coarse} is {ratio:.3g}x coarser than the finest axis; {advice}")
    orientations = fingerprint.orientations()
    if len(orientations) > 1:
        listed = ", ".join(f"{o} ({n} cases)" for o, n in orientations.items())
        found.append(
            f"orientations disagree: {listed}; seglight reorients every scan, but check the conversion of the odd ones"
        )
    return found


def _objects(fingerprint: Fingerprint, spacing: Sequence[float], mode: str, size: Sequence[int]) -> list[str]:
    found = []
    extent_mm = [n * s for n, s in zip(size, spacing, strict=True)]
    for value, label in fingerprint.label_statistics().items():
        name = label["name"]
        if not label["cases_with"]:
            found.append(f"label {value} ({name}) is declared but found in no case")
            continue
        largest = label["largest_extent_mm"]
        if largest is None:
            continue
        voxels = [e / s for e, s in zip(largest["min"], spacing, strict=True)]
        thin = [AXES[a] for a, v in enumerate(voxels) if v < FEW_VOXELS]
        if thin:
            found.append(
                f"label {name}: the smallest objects are {axes(np.round(largest['min'], 1))} mm, fewer than "
                f"{FEW_VOXELS} voxels along {', '.join(thin)} at the planned spacing: use a finer plan.target_spacing"
            )
        if mode == "patch":
            over = [AXES[a] for a in range(3) if largest["max"][a] > extent_mm[a]]
            if over:
                found.append(
                    f"label {name}: objects span up to {axes(np.round(largest['max'], 1))} mm, more than the patch "
                    f"({axes(np.round(extent_mm, 1))} mm) along {', '.join(over)}: no patch shows them whole"
                )
        if label["specks"]:
            found.append(
                f"label {name}: {label['specks']} component(s) of fewer than 10 voxels across the cases (label noise?)"
            )
    return found


def _modalities(fingerprint: Fingerprint, modalities: Sequence[str]) -> list[str]:
    found = []
    for channel, modality in zip(fingerprint.channels, modalities, strict=True):
        low = channel.image["p0.5"]
        if is_ct(modality) and low > CT_AIR_BELOW:
            found.append(
                f"channel {channel.index} is {modality}, but its images' 0.5th percentile is {low:.4g}: no air at "
                "-1000 HU, as if it were another modality (or already normalised); check plan.modality"
            )
        elif not is_ct(modality) and low <= CT_AIR_BELOW:
            found.append(
                f"channel {channel.index} is {modality}, but its images reach {low:.4g} at the 0.5th percentile, "
                "like air in CT Hounsfield units; if it is CT, say plan.modality=[CT]"
            )
    return found
