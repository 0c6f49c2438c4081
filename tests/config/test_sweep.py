"""Sweeps: every combination in its own folder, summary.csv best first, and a failed run does not stop the rest."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seglight.config.sweeps import collect_rows, format_table
from tests.helpers import REPO, run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def sweep_overrides(sweep_dir: Path, *drop: str) -> list[str]:
    """The tiny overrides for a multirun: one epoch each, all jobs under ``sweep_dir``."""
    keep = [
        o
        for o in tiny_overrides(sweep_dir)
        if not o.startswith(("hydra.run.dir", "trainer.max_epochs", *drop))
    ]
    return [*keep, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep_dir}"]


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def chosen(row: dict[str, str], key: str) -> str:
    """The value a run's overrides give ``key``."""
    return dict(o.split("=", 1) for o in row["overrides"].split())[key]


def test_grid_sweep_writes_summary_csv_best_first(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # The grid. model.init_filters is a SegResNet option, so both networks keep their defaults; 7 cases
    # leave 6 for training, so no batch has a single case (UNet's BatchNorm at a 1x1x1 bottleneck needs two).
    result = run_cli(
        "seglight.train",
        "-m",
        "model=segresnet,unet",
        "optimizer.lr=1e-3,1e-4",
        *sweep_overrides(sweep_dir, "model.init_filters", "data.demo.num_cases"),
        "data.demo.num_cases=7",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    combos = {(chosen(r, "model"), float(chosen(r, "optimizer.lr"))) for r in rows}
    assert combos == {(m, lr) for m in ("segresnet", "unet") for lr in (1e-3, 1e-4)}
    dice = [float(r["best_dice"]) for r in rows]
    assert dice == sorted(dice, reverse=True) and all(0.0 <= d <= 1.0 for d in dice)
    assert all(r["best_epoch"] == "0" and float(r["wall_time_s"]) > 0 for r in rows)
    job_dirs = {Path(r["output_dir"]) for r in rows}
    assert len(job_dirs) == 4 and all(
        d.parent == sweep_dir and (d / "checkpoints" / "last.ckpt").is_file() for d in job_dirs
    )
    # Printed as a table, best first; the overrides all runs share are listed once.
    table = result.stdout[result.stdout.index("Sweep summary") :]
    assert table.index(f"{dice[0]:.4f}") < table.index(f"{dice[-1]:.4f}") and "(all runs:" in table


def test_failed_runs_are_recorded_the_sweep_goes_on_and_exits_non_zero(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # A negative learning rate fails when the run builds its optimizer; model=nosuchnet cannot even be composed
    # (Hydra would stop the whole sweep at it before any job ran).
    result = run_cli(
        "seglight.train",
        "-m",
        "model=segresnet,nosuchnet",
        "optimizer.lr=-1,1e-3",
        *sweep_overrides(sweep_dir),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "job 0 failed, the sweep goes on" in result.stderr and "Invalid learning rate" in result.stderr
    assert "3 of 4 runs failed (jobs" in result.stderr.strip().splitlines()[-1]
    rows = read_summary(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "failed"]  # best first
    assert chosen(rows[0], "model") == "segresnet" and float(chosen(rows[0], "optimizer.lr")) == 1e-3
    assert rows[0]["best_dice"]
    runtime = next(
        r for r in rows if chosen(r, "model") == "segresnet" and float(chosen(r, "optimizer.lr")) < 0
    )
    assert "Invalid learning rate" in runtime["error"] and runtime["best_dice"] == ""
    composed = [r for r in rows if chosen(r, "model") == "nosuchnet"]
    assert len(composed) == 2 and all("Could not find 'model/nosuchnet'" in r["error"] for r in composed)
    assert all("segresnet" in r["error"] and Path(r["output_dir"]).parent == sweep_dir for r in composed)
    # The same rows, read back from the job folders, make the same table.
    assert "failed" in format_table(collect_rows(sweep_dir))


def test_sigterm_to_a_running_sweep_leaves_summary_csv(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "seglight.train", "-m", "trainer.max_epochs=1,500"]
    command += [o for o in sweep_overrides(sweep_dir) if not o.startswith("trainer.max_epochs")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "sweep.log"  # a file, not a pipe: a full pipe would block the sweep
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            # The second run is under way once it has saved its first epoch.
            deadline = time.monotonic() + 240
            while not (sweep_dir / "1" / "checkpoints" / "last.ckpt").exists():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
    assert process.returncode == 143, log.read_text()[-3000:]
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "interrupted")]
    assert (sweep_dir / "1" / "checkpoints" / "last.ckpt").is_file()  # resume=true continues it


def test_optuna_search_maximises_dice_over_lr_and_loss(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    result = run_cli(
        "seglight.train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *sweep_overrides(sweep_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(sweep_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    for row in rows:  # each trial drew a learning rate and a loss from the search space
        assert 1e-5 <= float(chosen(row, "optimizer.lr")) <= 1e-2
        assert chosen(row, "loss") in {"dice", "dicece", "dicefocal"}
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(float(r["best_dice"]) for r in rows))
