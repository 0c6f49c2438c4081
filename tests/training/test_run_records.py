"""summary.json has one schema (RunSummary) for training and sweeps, and one rule picks a run's model: best, else
last."""

from __future__ import annotations

import json
import os
from pathlib import Path

from seglight.config.sweeps import collect_rows, write_failure_summary
from seglight.training.checkpoints import best_checkpoint, best_else_last
from seglight.training.summary import RunSummary, read_summary

TRAINED_KEYS = [
    "status",
    "best_dice",
    "best_epoch",
    "best_checkpoint",
    "last_checkpoint",
    "epochs",
    "global_step",
    "interrupted",
    "wall_time_s",
    "validations",
    "validation_time_s",
    "output_dir",
]


def test_a_trained_run_and_a_failed_one_keep_their_keys(tmp_path: Path) -> None:
    trained = RunSummary(status="completed", best_dice=0.5, epochs=2, output_dir=str(tmp_path))
    assert list(trained.write(tmp_path)) == TRAINED_KEYS
    assert list(json.loads((tmp_path / "summary.json").read_text())) == TRAINED_KEYS
    assert read_summary(tmp_path) == trained

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    failed = write_failure_summary(job, "data.root: no such folder", 1.23)
    assert failed == {
        "status": "failed",
        "error": "data.root: no such folder",
        "best_dice": None,
        "best_epoch": None,
        "wall_time_s": 1.2,
        "output_dir": str(job),
    }
    (row,) = collect_rows(tmp_path / "sweep")
    assert (row["status"], row["error"], row["overrides"]) == ("failed", failed["error"], "optimizer.lr=0.1")


def test_best_else_last(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert best_checkpoint(run) is None
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    assert best_checkpoint(run) == last == best_else_last([None, run / "gone.ckpt"], [last])
    low, high = (run / "checkpoints" / f"best-epoch00{i}-dice0.{d}.ckpt" for i, d in ((1, 7), (0, 8)))
    low.write_bytes(b"")
    high.write_bytes(b"")
    os.utime(high, (1, 1))  # older, but the higher Dice wins
    assert best_checkpoint(run) == high
    RunSummary(status="completed", best_checkpoint=str(low), output_dir=str(run)).write(run)
    assert best_checkpoint(run) == low  # what the run recorded as its best comes first
