"""``summary.json``, the record a run leaves in its folder: one schema, read and written here only.

Training writes it when a run ends (``seglight.training.run_records.write_summary``), a sweep when one of its runs
failed or was stopped before training (``seglight.config.sweeps``); a sweep's ``summary.csv`` and prediction's
choice of a run's best checkpoint read it back. Light on imports: Hydra's plugin scan imports the sweeps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seglight.core.io import atomic_write_text

SUMMARY_FILE = "summary.json"
# What only a run that trained records.
TRAINER_FIELDS = (
    "best_checkpoint",
    "last_checkpoint",
    "epochs",
    "global_step",
    "interrupted",
    "validations",
    "validation_time_s",
)


@dataclass(frozen=True)
class RunSummary:
    """What ``summary.json`` says about one run.

    A run that training saw to its end (``completed``) or stopped (``interrupted``) records where the trainer
    got to; a run that failed, or was stopped before training, records its ``error`` instead.

    Args:
        status: ``completed``, ``interrupted`` or ``failed``.
        error: why the run failed (one line); None for a run that trained.
        best_dice: the best ``Dice/val``; None when no validation ran.
        best_epoch: the epoch of the best checkpoint (counted from 0, as Lightning does).
        best_checkpoint: the best checkpoint's path.
        last_checkpoint: the newest ``last.ckpt``'s path.
        epochs: the trainer's epoch count when the run ended.
        global_step: optimiser steps taken.
        interrupted: whether Lightning reports the fit as interrupted.
        wall_time_s: the session's wall time, seconds.
        validations: this session's validations (the sanity check excluded).
        validation_time_s: their total wall time, seconds.
        output_dir: the run folder.
    """

    status: str
    error: str | None = None
    best_dice: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    epochs: int | None = None
    global_step: int | None = None
    interrupted: bool | None = None
    wall_time_s: float | None = None
    validations: int | None = None
    validation_time_s: float | None = None
    output_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The keys of ``summary.json``: a run that failed has an ``error`` and no trainer figures; one that
        trained has no ``error`` key."""
        values = dataclasses.asdict(self)
        left_out = TRAINER_FIELDS if self.error is not None else ("error",)
        return {key: value for key, value in values.items() if key not in left_out}

    def write(self, folder: str | Path) -> dict[str, Any]:
        """Save as ``<folder>/summary.json`` (atomically); returns what was written."""
        record = self.as_dict()
        atomic_write_text(Path(folder) / SUMMARY_FILE, json.dumps(record, indent=2))
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RunSummary:
        """A summary from ``summary.json``'s keys (unknown keys ignored; a record without a status is a failure)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in record.items() if key in names}
        values.setdefault("status", "failed")
        return cls(**values)


def read_summary(folder: str | Path) -> RunSummary | None:
    """The run's ``summary.json``, or None when the folder has none (or only an unreadable or empty one)."""
    try:
        record = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not record:
        return None
    return RunSummary.from_dict(record)
