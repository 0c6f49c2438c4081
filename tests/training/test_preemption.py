"""Preemption: SIGTERM or Ctrl-C mid-run saves a checkpoint and exits 128+signal; resume=true finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli, tensorboard_scalars, tiny_overrides

pytestmark = pytest.mark.slow

EPOCHS = 4


def start_training(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("trainer.max_epochs")]
    env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "seglight.train", *overrides, f"trainer.max_epochs={EPOCHS}", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def interrupt_after_saves(process: subprocess.Popen, run_dir: Path, signum: int, saves: int = 1) -> str:
    """Send ``signum`` once last.ckpt has been written ``saves`` times; returns the run's output.

    The first save ends epoch 1, so the signal reaches a run in its second epoch; each write replaces the file
    (a new inode: atomic rename), which is how further saves are told apart.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    while len(seen) < saves:
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"last.ckpt was written {len(seen)} times, not {saves}"
        if last.exists():
            seen.add(last.stat().st_ino)
        time.sleep(0.005)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=240)
    return output


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    # A step-based checkpoint at step 4, the first of epoch 2 (5 training cases, batches of 2: 3 steps an epoch);
    # SIGTERM after it arrives in the middle of the second epoch.
    process = start_training(run_dir, cache_dir, "callbacks.preemption.every_n_train_steps=4")
    output = interrupt_after_saves(process, run_dir, signal.SIGTERM, saves=2)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Received SIGTERM" in output
    assert "Interrupted by SIGTERM" in output and "resume=true" in output, output[-3000:]

    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    steps_per_epoch = 3
    assert saved["epoch"] >= 1 and 4 <= saved["global_step"] < EPOCHS * steps_per_epoch
    assert not list(last.parent.glob(".*.partial"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == saved["global_step"]

    # The same command line with resume=true picks up last.ckpt by itself and trains to the end.
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("trainer.max_epochs")]
    result = run_cli(
        "seglight.train", *overrides, f"trainer.max_epochs={EPOCHS}", "resume=true", cache=cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == EPOCHS * steps_per_epoch and final["epoch"] == EPOCHS - 1
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    sessions = json.loads((run_dir / "run_info.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from"] == str(last)
    curves = tensorboard_scalars(run_dir)
    for tag in ("Dice/val", "Loss/train"):
        steps = [step for step, _ in curves[tag]]
        assert len(steps) == EPOCHS and steps == sorted(set(steps)), (tag, steps)


def test_ctrl_c_stops_at_a_step_boundary_with_status_130(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    process = start_training(run_dir, cache_dir)
    output = interrupt_after_saves(process, run_dir, signal.SIGINT)
    assert process.returncode == 130, output[-3000:]
    assert "Received SIGINT" in output and "Interrupted by SIGINT" in output
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 3 and saved["optimizer_states"]
