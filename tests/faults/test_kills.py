"""SIGKILL at any moment: a run killed during the cache fill, the first epoch's set-up, a step, a validation or a
checkpoint write (and at random moments, with fixed seeds) is continued with resume=true and finishes. After each
kill nothing a reader opens is truncated (checkpoints, cache entries, split.json, summary.json...; TensorBoard's
append-only event files once the resumed run has repaired them), and the resumed run loses at most the steps since
the last refresh of last.ckpt (callbacks.preemption.every_n_train_steps). A prediction killed part-way is completed
by a rerun, and no half-written mask is left under a final name.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight.prediction.cases import predict
from seglight.train import train
from seglight.training.checkpoints import resume_candidates, safe_load
from tests.faults.integrity import damaged_files
from tests.helpers import (
    REPO,
    plug_callback,
    run_cli,
    tensorboard_scalars,
    tiny_config,
    tiny_overrides,
    write_nifti,
)

pytestmark = pytest.mark.slow

EPOCHS, STEPS_PER_EPOCH, EVERY_N = 3, 3, 2
SEEDS = [1, 5, 0]  # kill 3.6 s, 9.5 s and 12.1 s into a session: set-up, steps, validation or a save


class Run:
    """One tiny run in ``folder``, started as a user would, killed and continued; it keeps count of its steps."""

    def __init__(self, folder: Path, session_cache: Path) -> None:
        self.dir = folder / "run"
        self.cache = folder / "preprocessed"  # its own disk cache: filling it is one of the moments
        self.steps = folder / "steps.txt"
        self.session_cache = session_cache
        self.sessions = 0

    def overrides(self) -> list[str]:
        overrides = [o for o in tiny_overrides(self.dir) if not o.startswith("trainer.max_epochs")]
        return [
            *overrides,
            f"trainer.max_epochs={EPOCHS}",
            "data.cache=disk",
            f"data.cache_dir={self.cache}",
            f"callbacks.preemption.every_n_train_steps={EVERY_N}",
            "logger=[tensorboard,csv]",  # both trackers' append-only files
            plug_callback("steps", "RecordSteps", path=self.steps),
        ]

    def start(self, *extra: str) -> subprocess.Popen:
        resume = ["resume=true"] if self.sessions else []
        self.sessions += 1
        env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(self.session_cache), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, "-m", "seglight.train", *self.overrides(), *resume, *extra]
        self.log = self.dir.parent / f"session-{self.sessions}.log"
        with open(self.log, "w") as log:  # a file, not a pipe: a child never blocks on a full pipe
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def recorded(self) -> list[int]:
        return [int(line) for line in self.steps.read_text().split()] if self.steps.exists() else []

    def check_after_kill(self, process: subprocess.Popen, steps_before: int) -> None:
        """The process died by SIGKILL; what it left is readable and loses at most ``EVERY_N`` steps."""
        assert process.returncode == -signal.SIGKILL, (process.returncode, self.log.read_text()[-3000:])
        assert damaged_files(self.dir, [self.cache], trackers=False) == []
        reached = max(self.recorded()[steps_before:], default=None)
        if reached is None:
            return  # killed before a step of this session: nothing of it to lose
        candidates = resume_candidates(self.dir / "checkpoints", self.dir)
        saved = max((int(safe_load(p)["global_step"]) for p in candidates), default=0)
        assert reached - saved <= EVERY_N, f"reached step {reached}, the newest checkpoint holds {saved}"

    def kill_at(self, callback: str) -> None:
        """A session that a test callback kills (SIGKILL) at its moment."""
        before = len(self.recorded())
        process = self.start(callback)
        process.wait(timeout=300)
        self.check_after_kill(process, before)

    def finish(self) -> None:
        """Continue in this process until the end; then every file reads whole, trackers included."""
        overrides = [o for o in self.overrides() if not o.startswith(("hydra.", "+callbacks.steps"))]
        summary = train(tiny_config(self.dir, *overrides, "resume=true"))
        assert summary["status"] == "completed"
        assert safe_load(self.dir / "checkpoints" / "last.ckpt")["global_step"] == EPOCHS * STEPS_PER_EPOCH
        assert damaged_files(self.dir, [self.cache]) == []
        validated = {step for step, _ in tensorboard_scalars(self.dir)["Dice/val"]}
        assert len(validated) == EPOCHS, f"validations at steps {sorted(validated)}: one per epoch expected"


def test_sigkill_at_each_awkward_moment_then_resume_finishes(tmp_path: Path, cache_dir: Path) -> None:
    run = Run(tmp_path, cache_dir)
    kill = {"name": "SIGKILL"}
    # In the middle of the cache fill: its first entry is written, the others are not.
    run.kill_at(plug_callback("kill", "SignalWhenFileAppears", pattern=run.cache / "*.pt", **kill))
    run.kill_at(plug_callback("kill", "SignalInHook", hook="on_train_start", **kill))
    run.kill_at(plug_callback("kill", "SignalInHook", hook="on_before_optimizer_step", step=1, **kill))
    run.kill_at(plug_callback("kill", "SignalInHook", hook="on_validation_batch_start", step=3, **kill))
    pattern = run.dir / "checkpoints" / ".last.ckpt.*.partial"
    run.kill_at(plug_callback("kill", "SignalWhenFileAppears", pattern=pattern, **kill))
    run.finish()


def test_sigkill_at_random_moments_then_resume_finishes(tmp_path: Path, cache_dir: Path) -> None:
    """Three kills at random moments (fixed seeds) of one run's sessions, each measured from its job's start."""
    run = Run(tmp_path, cache_dir)
    for seed in SEEDS:
        before, started = len(run.recorded()), time.time()
        process = run.start()
        config = (
            run.dir / ".hydra" / "config.yaml"
        )  # Hydra writes it as the job starts, right before training
        deadline = time.monotonic() + 120
        while not (config.exists() and config.stat().st_mtime >= started) and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(2.0, 14.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if process.returncode == 0:
            break  # the session ended before the kill came
        run.check_after_kill(process, before)
    run.finish()


def test_a_killed_prediction_is_completed_by_a_rerun(
    trained_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    rng = np.random.default_rng(0)
    scans = tmp_path / "scans"
    for name in ("a", "b", "c"):
        write_nifti(scans / f"{name}.nii.gz", rng.normal(0, 100, (24, 24, 16)).astype(np.float32))
    output = tmp_path / "masks"
    command = ["seglight.predict", f"ckpt={trained_run}", f"input={scans}", f"output={output}", "device=cpu"]
    env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (output / "a.nii.gz").exists() and process.poll() is None:  # killed once the first mask is in
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    finished = {p.name: p.stat().st_mtime_ns for p in output.glob("*.nii.gz")}
    assert "a.nii.gz" in finished and damaged_files(output) == []  # masks in place are whole

    result = run_cli(*command, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"kept {len(finished)} finished earlier" in result.stdout
    assert sorted(p.name for p in output.glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert all((output / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert not [p for p in output.iterdir() if ".partial" in p.name]

    # The same masks as a prediction that was never stopped; overwrite=true predicts every case again.
    fresh = predict(trained_run, scans, tmp_path / "fresh", device="cpu")
    for name in ("a", "b", "c"):
        kept, again = (
            nib.load(folder / f"{name}.nii.gz").get_fdata() for folder in (output, tmp_path / "fresh")
        )
        assert np.array_equal(kept, again), name
    assert len(fresh.written) == 3
    again = predict(trained_run, scans, output, device="cpu", overwrite=True)
    assert len(again.written) == 3 and not again.kept
