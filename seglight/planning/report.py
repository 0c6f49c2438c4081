"""The printout of ``python -m seglight.plan``: the fingerprint as a table, then each decision with its rule and
numbers, then the warnings."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from seglight.planning.fingerprint import AXES, Fingerprint
from seglight.planning.planner import Plan

WIDTH = 110
COLUMNS = ("min", "p10", "median", "p90", "max")


def format_fingerprint(fingerprint: Fingerprint) -> str:
    """Cases, geometry percentiles, anisotropy, orientations, channels and labels."""
    data = fingerprint.to_dict()
    where = fingerprint.source.get("root", "")
    lines = [
        f"Fingerprint: {fingerprint.num_cases} cases{f' in {where}' if where else ''} (read in "
        f"{fingerprint.seconds:.1f} s by {fingerprint.workers} thread(s)); per axis (x × y × z)"
    ]
    rows = [("", *COLUMNS)]
    for title, key, fmt in (
        ("spacing (mm)", "spacing_mm", ".3g"),
        ("shape (voxels)", "shape", "g"),
        ("non-zero region", "cropped_shape", "g"),
    ):
        rows.append((title, *(_triple(data[key][c], fmt) for c in COLUMNS)))
    lines += _table(rows)
    anisotropy = data["anisotropy"]
    lines.append(
        f"  anisotropy: {anisotropy['coarse_axis']} is {anisotropy['ratio']:g}x coarser than "
        f"{anisotropy['fine_axis']} (median spacings); the non-zero region keeps {data['median_kept_fraction']:.0%} "
        "of a volume (median)"
    )
    lines.append("  orientations: " + ", ".join(f"{o} ({n} cases)" for o, n in data["orientations"].items()))
    for channel in fingerprint.channels:
        fg, image = channel.foreground, channel.image
        lines += _wrapped(f"channel {channel.index}: {channel.modality} ({channel.source})", "  ")
        lines += _wrapped(
            f"foreground: mean {fg['mean']:.4g}, std {fg['std']:.4g}, p0.5 {fg['p0.5']:.4g}, p50 {fg['p50']:.4g}, "
            f"p99.5 {fg['p99.5']:.4g}, min {fg['min']:.4g}, max {fg['max']:.4g} ({fg['samples']:.0f} voxels sampled)",
            "    ",
        )
        lines += _wrapped(
            f"whole images: p0.5 {image['p0.5']:.4g}, p50 {image['p50']:.4g}, p99.5 {image['p99.5']:.4g} (median "
            f"over cases), min {image['min']:.4g}, max {image['max']:.4g}",
            "    ",
        )
    for value, label in fingerprint.label_statistics().items():
        text = (
            f"label {value} {label['name']}: {label['voxel_share']:.3%} of the voxels, in {label['cases_with']} of "
            f"{fingerprint.num_cases} cases; {label['components_median']:g} component(s) per case (max "
            f"{label['components_max']})"
        )
        if label["specks"]:
            text += f", {label['specks']} speck(s) under 10 voxels"
        lines += _wrapped(text, "  ")
        extent = label["largest_extent_mm"]
        if extent is not None:
            lines += _wrapped(
                f"largest object per case (mm, x × y × z): median {_triple(extent['median'], '.3g')}, smallest "
                f"{_triple(extent['min'], '.3g')}, largest {_triple(extent['max'], '.3g')}; volume median "
                f"{label['largest_volume_mm3_median']:.4g} mm³",
                "    ",
            )
    if fingerprint.skipped:
        lines.append(
            f"  skipped (data.on_bad_case=skip): {', '.join(str(s['case_id']) for s in fingerprint.skipped)}"
        )
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """Each decision: its value, the rule, the numbers; then the warnings."""
    memory = plan.memory
    lines = [
        f"Plan (memory {memory['method']}, precision {memory['precision']}; planned in {plan.seconds:.1f} s):"
    ]
    for decision in plan.decisions:
        kept = " (kept as given)" if decision.kept else ""
        lines += _wrapped(f"{decision.name}: {_value(decision.value)}{kept}", "  ")
        lines += _wrapped(f"rule: {decision.rule}", "      ")
        lines += _wrapped(f"numbers: {decision.numbers}", "      ")
    if plan.risks:
        lines.append("Warnings:")
        for risk in plan.risks:
            lines += _wrapped(f"- {risk}", "  ")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int | float) for v in value):
        return ", ".join(f"{a} {v:g}" for a, v in zip(AXES, value, strict=True))
    return str(value)


def _triple(values: Sequence[float], fmt: str) -> str:
    return "×".join(format(float(v), fmt) for v in values)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip() for row in rows]


def _wrapped(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ")
