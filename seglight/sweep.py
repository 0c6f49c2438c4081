"""Sweeps that survive one bad trial: failures are recorded per job, and ``summary.csv`` ranks all runs.

``python -m seglight.train -m model=segresnet,unet optimizer.lr=1e-3,1e-4`` runs the four combinations, each in
its own folder under the sweep folder; at the end ``SweepSummary`` (a Hydra callback, see
``conf/hydra/default.yaml``) writes ``summary.csv`` there and prints it as a table, best first.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seglight.errors import find_user_error
from seglight.io import atomic_write_text
from seglight.report import write_failure_summary

log = logging.getLogger("seglight")

COLUMNS = ("job", "status", "best_dice", "best_epoch", "wall_time_s", "overrides", "error", "output_dir")


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``, or a sweeper such as Optuna)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(task: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """``task(cfg)``; in a multirun a failure is recorded in the job's ``summary.json`` and returned, not raised.

    Hydra aborts a whole sweep at the first job that raises; a failed trial should cost only itself. Outside a
    multirun errors propagate unchanged (one line and exit status 2 for user errors). Interrupts (SIGTERM,
    Ctrl-C) are not failures of the trial: they stop the sweep.
    """
    if not is_multirun():
        return task(cfg)
    started = time.monotonic()
    try:
        return task(cfg)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is not None:
            message = str(user_error)
        else:
            message = f"{type(exc).__name__}: {str(exc).strip()}"
            log.exception("Job failed with an unexpected error")  # the traceback goes to the job's log
        job = HydraConfig.get().job
        print(
            f"seglight.train: job {job.num} failed, the sweep goes on: {message}", file=sys.stderr, flush=True
        )
        output_dir = HydraConfig.get().runtime.output_dir
        return write_failure_summary(output_dir, message, time.monotonic() - started)


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, ``summary.csv`` in the sweep folder and a table, best first."""

    def __init__(self, filename: str = "summary.csv") -> None:
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        atomic_write_text(sweep_dir / self.filename, to_csv(rows))
        print(f"\nSweep summary ({sweep_dir / self.filename}):\n{format_table(rows)}", flush=True)


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (its overrides and summary.json), best Dice first."""
    rows = []
    for overrides_file in sweep_dir.glob("**/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        if job_dir == sweep_dir:
            continue
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        summary = _read_json(job_dir / "summary.json")
        hydra_cfg = (
            OmegaConf.load(job_dir / ".hydra" / "hydra.yaml")
            if (job_dir / ".hydra/hydra.yaml").is_file()
            else {}
        )
        job_num = OmegaConf.select(hydra_cfg, "hydra.job.num", default=None) if hydra_cfg else None
        rows.append(
            {
                "job": job_num if job_num is not None else job_dir.name,
                "status": summary.get("status", "failed" if summary else "no summary (killed?)"),
                "best_dice": summary.get("best_dice"),
                "best_epoch": summary.get("best_epoch"),
                "wall_time_s": summary.get("wall_time_s"),
                "overrides": " ".join(overrides),
                "error": summary.get("error") or "",
                "output_dir": str(job_dir),
            }
        )
    return sorted(rows, key=_rank)


def _rank(row: dict[str, Any]) -> tuple:
    dice = row["best_dice"]
    completed = row["status"] == "completed"
    return (not completed, dice is None, -(dice or 0.0), str(row["job"]).zfill(6))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text with a header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows; overrides shared by every run are listed once, below it."""
    split = [row["overrides"].split() for row in rows]
    shared = set.intersection(*(set(s) for s in split)) if split else set()
    header = ("#", "status", "Dice/val", "epoch", "time", "overrides")
    lines = [header]
    for row, overrides in zip(rows, split, strict=True):
        dice = f"{row['best_dice']:.4f}" if row["best_dice"] is not None else "-"
        epoch = str(row["best_epoch"]) if row["best_epoch"] is not None else "-"
        wall = f"{row['wall_time_s']:.0f}s" if row["wall_time_s"] is not None else "-"
        varying = " ".join(o for o in overrides if o not in shared)
        if row["error"]:
            varying += f"  [{row['error'][:120]}]"
        lines.append((str(row["job"]), row["status"], dice, epoch, wall, varying))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )
    if shared:
        text += "\n(all runs: " + " ".join(o for o in split[0] if o in shared) + ")"
    return text
