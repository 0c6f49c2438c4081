"""What the dataset check found: findings per file, what it learnt per case, and the summary it prints."""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from seglight.core.errors import DataError

# The intensity percentiles the check reports per channel.
PERCENTILES = (0.5, 50.0, 99.5)

log = logging.getLogger("seglight")


@dataclass
class Finding:
    """One problem (``error``) or oddity (``warning``) with one file."""

    severity: str
    path: str
    message: str
    case_index: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CaseInfo:
    """What the check learnt about one case, for the summary table."""

    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    channels: int
    percentiles: list[list[float]] = field(default_factory=list)  # per channel: PERCENTILES
    label_counts: dict[int, int] = field(default_factory=dict)


@dataclass
class DatasetReport:
    """The outcome of checking a dataset: per-case facts and every finding."""

    num_cases: int
    full: bool
    infos: list[CaseInfo] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def bad_cases(self) -> dict[int, list[str]]:
        """Index of each case with an error -> its error messages."""
        bad: dict[int, list[str]] = {}
        for finding in self.errors:
            if finding.case_index is not None:
                bad.setdefault(finding.case_index, []).append(str(finding))
        return bad

    def error_message(self) -> str:
        """All errors as one message (the single error itself when there is one)."""
        errors = self.errors
        if len(errors) == 1:
            return str(errors[0])
        cases = len({f.case_index for f in errors})
        return f"{len(errors)} problems in {cases} of {self.num_cases} cases:\n  " + "\n  ".join(
            map(str, errors)
        )

    def raise_for_errors(self) -> None:
        """Raise DataError listing every error, if there is any."""
        if self.errors:
            raise DataError(self.error_message())

    def summary(self) -> str:
        """The table ``python -m seglight.check`` prints: shapes, spacings, orientations, intensities, labels."""
        return format_summary(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, saved by the check next to its log."""
        return {
            "num_cases": self.num_cases,
            "full": self.full,
            "errors": [str(f) for f in self.errors],
            "warnings": [str(f) for f in self.warnings],
            "cases": [asdict(info) for info in self.infos],
        }


def format_summary(report: DatasetReport) -> str:
    """Rows of min / median / max over the cases, then orientations, channels and problems."""
    infos = report.infos
    lines = [
        f"Dataset check ({'every voxel' if report.full else 'headers only'}): {report.num_cases} cases, "
        f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    ]
    if not infos:
        return "\n".join(lines)
    rows: list[tuple[str, str, str, str]] = [("", "min", "median", "max")]

    def axis_row(name: str, values: list[tuple[float, ...]], fmt: str) -> None:
        columns = list(zip(*values, strict=True))
        stats = [[f(col) for col in columns] for f in (min, statistics.median, max)]
        rows.append((name, *("×".join(format(v, fmt) for v in s) for s in stats)))

    axis_row("shape (voxels)", [i.shape for i in infos], "g")
    axis_row("spacing (mm)", [i.spacing for i in infos], ".3g")
    num_channels = max(i.channels for i in infos)
    for c in range(num_channels):
        values = [i.percentiles[c] for i in infos if len(i.percentiles) > c]
        for k, p in enumerate(PERCENTILES):
            column = [v[k] for v in values]
            if column:
                rows.append(
                    (
                        f"intensity ch{c} p{p:g}",
                        *(format(f(column), ".4g") for f in (min, statistics.median, max)),
                    )
                )
    label_values = sorted({v for i in infos for v in i.label_counts})
    for value in label_values:
        counts = [i.label_counts.get(value, 0) for i in infos if i.label_counts]
        name = report.labels.get(value)
        rows.append(
            (
                f"label {value}{f' ({name})' if name else ''} voxels",
                *(format(f(counts), ",.0f") for f in (min, statistics.median, max)),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(4)]
    lines += [
        ("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]
    orientations = Counter(i.orientation for i in infos)
    lines.append("  orientation: " + ", ".join(f"{o} ({n} cases)" for o, n in orientations.most_common()))
    channel_counts = Counter(i.channels for i in infos)
    lines.append("  channels: " + ", ".join(f"{c} ({n} cases)" for c, n in channel_counts.most_common()))
    if report.labels:
        lines.append("  declared labels: " + ", ".join(f"{v} {n}" for v, n in sorted(report.labels.items())))
    return "\n".join(lines)


def format_shape(shape: Sequence[int]) -> str:
    """A shape as people write it: ``96×96×48``."""
    return "×".join(str(int(s)) for s in shape)
