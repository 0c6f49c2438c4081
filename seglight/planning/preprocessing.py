"""The planning rules for what the network is fed: intensity normalisation and where patches are centred."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from seglight.planning.fingerprint import Fingerprint, is_ct
from seglight.planning.rules import Decision

SMALL_STRUCTURE = 0.01  # a label under this share of the voxels is a small structure
RARE_CLASS = 0.1  # a label under this fraction of the most frequent label's share is rare
NONZERO_MASK_BELOW = 0.75  # nnU-Net: normalise inside the non-zero region when cropping kept less than this
CT_CLIP = ("p0.5", "p99.5")  # CT: clip to these foreground percentiles (nnU-Net)


def decide_normalization(fingerprint: Fingerprint, modalities: Sequence[str]) -> Decision:
    """CT: clip to the foreground's 0.5/99.5 percentiles, then z-score with the foreground mean/std. Others:
    z-score per image, inside the non-zero region when cropping to it keeps < 75 % of the voxels (nnU-Net)."""
    kept = fingerprint.median_kept_fraction()
    modes, numbers = [], []
    intensity: dict[str, list[float | None]] = {"low": [], "high": [], "mean": [], "std": []}
    for channel, modality in zip(fingerprint.channels, modalities, strict=True):
        fg = channel.foreground
        if is_ct(modality) and fg["samples"]:
            modes.append("ct")
            values = (fg[CT_CLIP[0]], fg[CT_CLIP[1]], fg["mean"], max(fg["std"], 1e-8))
            for key, value in zip(intensity, values, strict=True):
                intensity[key].append(round(float(value), 4))
            numbers.append(
                f"channel {channel.index} ({modality}): foreground p0.5 {fg['p0.5']:.4g}, p99.5 {fg['p99.5']:.4g}, "
                f"mean {fg['mean']:.4g}, std {fg['std']:.4g} ({fg['samples']} voxels sampled)"
            )
            continue
        mode = "zscore_nonzero" if kept < NONZERO_MASK_BELOW else "zscore"
        modes.append(mode)
        for key in intensity:
            intensity[key].append(None)
        numbers.append(
            f"channel {channel.index} ({modality}): {mode}, non-zero region keeps {kept:.0%} of the voxels "
            f"(median; the mask is used below {NONZERO_MASK_BELOW:.0%})"
        )
    overrides: dict[str, Any] = {"data.normalize": modes[0] if len(set(modes)) == 1 else modes}
    if "ct" in modes:
        overrides.update({f"data.intensity.{k}": v for k, v in intensity.items()})
    return Decision(
        "normalisation",
        overrides["data.normalize"],
        "CT: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std; others: z-score "
        "per image (inside the non-zero region when cropping removes much)",
        "; ".join(numbers),
        overrides,
    )


def decide_sampling(fingerprint: Fingerprint, pos_neg_ratio: Sequence[float]) -> Decision:
    """Patch centres: several classes with one rare (< 10 % of the most frequent's share): one share per class
    (``class_ratios``); one small structure (< 1 % of the voxels): two foreground centres per background one;
    else the configured ``pos_neg_ratio``."""
    labels = fingerprint.label_statistics()
    shares = {v: s["voxel_share"] for v, s in labels.items()}
    listed = ", ".join(f"{labels[v]['name']} {s:.3%}" for v, s in shares.items())
    if len(shares) > 1:
        largest = max(shares.values()) or 1.0
        rare = [labels[v]["name"] for v, s in shares.items() if s < RARE_CLASS * largest]
        if rare:
            ratios = [1.0] * (max(shares) + 1)
            return Decision(
                "patch sampling",
                {"class_ratios": ratios},
                f"a class under {RARE_CLASS:.0%} of the most frequent one's voxels: centre patches on every class "
                "alike (background included)",
                f"voxel shares {listed}; rare: {', '.join(rare)}",
                {"data.patch.class_ratios": ratios},
            )
    smallest = min(shares.values(), default=1.0)
    if smallest < SMALL_STRUCTURE:
        ratio = [2.0, 1.0]
        rule = f"a structure under {SMALL_STRUCTURE:.0%} of the voxels: two foreground-centred patches per background one"
    else:
        ratio = [float(v) for v in pos_neg_ratio]
        rule = f"no structure under {SMALL_STRUCTURE:.0%} of the voxels: the configured foreground : background ratio"
    return Decision(
        "patch sampling",
        {"pos_neg_ratio": ratio},
        rule,
        f"voxel shares {listed}",
        {"data.patch.pos_neg_ratio": ratio},
    )
