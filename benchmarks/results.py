"""What every benchmark shares: the machine's name and description, rows of the one table, and the JSON file the
figures go to (``benchmarks/results/<machine>.json``, one section per benchmark, merged across scripts)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One line of the table: seglight's figure against the reference's, measured side by side."""

    benchmark: str
    unit: str
    seglight: float | None
    reference: float | None
    # seglight / reference, or reference / seglight for figures where less is better (``lower_is_better``)
    lower_is_better: bool = False
    goal: str = ""
    goal_ratio: float | None = None  # the ratio the goal asks for at least (None: no goal)
    goal_min: float | None = None  # or a bound on seglight's own figure
    goal_max: float | None = None
    spread: str = ""  # min..max of the ratio over the repeats
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.seglight is None or self.reference is None or 0 in (self.seglight, self.reference):
            return None
        return self.reference / self.seglight if self.lower_is_better else self.seglight / self.reference

    @property
    def met(self) -> bool | None:
        checks = []
        if self.goal_ratio is not None:
            checks.append(None if self.ratio is None else self.ratio >= self.goal_ratio)
        if self.goal_min is not None:
            checks.append(None if self.seglight is None else self.seglight >= self.goal_min)
        if self.goal_max is not None:
            checks.append(None if self.seglight is None else self.seglight <= self.goal_max)
        if not checks or None in checks:
            return None
        return all(checks)

    def as_dict(self) -> dict[str, Any]:
        """The row with its ratio and verdict, for the JSON file."""
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def machine_description() -> dict[str, Any]:
    """What the figures were measured on: CPU model and cores, GPU, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_name(description: dict[str, Any] | None = None) -> str:
    """A file name for this machine: the GPU's model, else the CPU's, with the core count."""
    description = description or machine_description()
    model = description["gpu"] or f"cpu {description['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", f"{model} {description['cores']}cores".lower()).strip("-")


def write_results(
    section: str, rows: Sequence[Row], details: dict[str, Any], results_dir: str | Path | None = None
) -> Path:
    """Merge one benchmark's figures into ``<results_dir>/<machine>.json`` (written atomically); returns it."""
    description = machine_description()
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{machine_name(description)}.json"
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
    record["machine"] = description
    record.setdefault("benchmarks", {})[section] = {
        "measured": datetime.now().isoformat(timespec="seconds"),
        "rows": [row.as_dict() for row in rows],
        "details": details,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=2, default=str)
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """The rows as one plain-text table (what ``make bench`` prints)."""
    header = ("benchmark", "unit", "seglight", "reference", "ratio", "spread", "goal", "met")
    lines = [
        (
            row.benchmark,
            row.unit,
            _number(row.seglight),
            _number(row.reference),
            f"{row.ratio:.2f}x" if row.ratio is not None else "n/a",
            row.spread,
            row.goal,
            {True: "yes", False: "NO", None: ""}[row.met],
        )
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    text = [title] if title else []
    text.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    text.append("  ".join("-" * w for w in widths))
    text += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    notes = [f"  {row.benchmark}: {row.notes}" for row in rows if row.notes]
    if notes:
        text += ["notes:", *notes]
    return "\n".join(text)


def spread(values: Sequence[float]) -> str:
    """``min..max`` of repeated figures (empty for one)."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f"{min(values):.2f}..{max(values):.2f}"


def median(values: Sequence[float | None]) -> float | None:
    """Median of the figures that exist."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"
