"""Hydra callbacks: check a command's options before Hydra makes the run folder; the summary of a sweep."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig

from seglight.config.sweeps import EXIT_RUNS_FAILED, write_sweep_summary
from seglight.core.errors import reported_errors


class CheckBeforeRun(Callback):
    """Hydra callback: ``check(cfg)`` before Hydra makes the run folder, so that a missing or wrong option stops the
    command with its one line (exit status 2) and leaves no folder behind.

    Args:
        check: dotted path of a function that takes the composed config and raises a SeglightError.
        prog: the command's name for the message (``seglight.predict: error: ...``).
    """

    def __init__(self, check: str, prog: str = "seglight") -> None:
        self.check = check
        self.prog = prog

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        with reported_errors(self.prog):
            get_method(self.check)(config)


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, ``summary.csv`` in the sweep folder and a table, best first.

    A sweep in which any run failed then exits with status 1, so a scheduler or script can tell.
    """

    def __init__(self, filename: str = "summary.csv") -> None:
        self.filename = filename

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = write_sweep_summary(Path(config.hydra.sweep.dir), self.filename)
        failed = [row for row in rows if row["status"] != "completed"]
        if failed:
            print(
                f"seglight.{config.get('task_name') or 'train'}: {len(failed)} of {len(rows)} runs failed "
                f"(jobs {', '.join(str(row['job']) for row in failed)}; listed in summary.csv)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_RUNS_FAILED)
