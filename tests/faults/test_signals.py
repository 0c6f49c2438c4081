"""Signals at awkward moments: SIGTERM during a validation, during a checkpoint write, during the S3 download before
the first step, during test=true's predictions, and a second SIGTERM while the first one's checkpoint is saved.
Each exits with the documented status (143) and leaves a run that resume=true finishes.

The moments are hit deterministically by test callbacks that signal the process from inside a hook or as soon as a
file appears (``tests/callbacks.py``); every interrupted run is then resumed to its end.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from seglight.config.builder import compose
from seglight.train import train
from seglight.training.checkpoints import safe_load
from tests.faults.integrity import damaged_files
from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import S3, make_msd_dataset, plug_callback, run_cli, tiny_config, tiny_overrides

pytestmark = pytest.mark.slow

SIGTERM_STATUS = 128 + signal.SIGTERM
STEPS_PER_EPOCH = 3  # 5 training cases in batches of 2


def train_cli(run_dir: Path, cache: Path, *extra: str):
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("trainer.max_epochs")]
    return run_cli("seglight.train", *overrides, "trainer.max_epochs=3", *extra, cache=cache)


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["status"]


def last_step(run_dir: Path) -> int:
    return int(safe_load(run_dir / "checkpoints" / "last.ckpt")["global_step"])


def test_sigterm_during_validation_a_checkpoint_write_and_twice_each_leave_a_resumable_run(
    tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    # 1. During the first validation: the run stops at the next step boundary, the first of epoch 2.
    during_validation = plug_callback("sig", "SignalInHook", hook="on_validation_batch_start", name="SIGTERM")
    result = train_cli(run_dir, cache_dir, during_validation)
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert last_step(run_dir) == STEPS_PER_EPOCH and status(run_dir) == "interrupted"

    # 2. While last.ckpt is being written (end of epoch 2): the write completes, the run stops after it.
    pattern = run_dir / "checkpoints" / ".last.ckpt.*.partial"
    during_write = plug_callback("sig", "SignalWhenFileAppears", pattern=pattern, name="SIGTERM")
    result = train_cli(run_dir, cache_dir, during_write, "resume=true")
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert last_step(run_dir) == 2 * STEPS_PER_EPOCH and status(run_dir) == "interrupted"

    # 3. A SIGTERM after step 7, and a second one while the first one's last.ckpt is being saved.
    first = plug_callback("first", "SignalAtStep", step=7)
    second = plug_callback("second", "SignalInHook", hook="on_save_checkpoint", name="SIGTERM", step=7)
    result = train_cli(run_dir, cache_dir, first, second, "resume=true")
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert "Interrupted by SIGTERM at step 7" in result.stdout + result.stderr
    assert last_step(run_dir) == 7 and not list((run_dir / "checkpoints").glob(".*partial*"))

    summary = train(tiny_config(run_dir, "trainer.max_epochs=3", "resume=true"))
    assert summary["status"] == "completed" and last_step(run_dir) == 3 * STEPS_PER_EPOCH
    assert damaged_files(run_dir) == []


def test_sigterm_during_the_s3_download_before_the_first_step(
    s3: S3, tmp_path: Path, cache_dir: Path
) -> None:
    url = s3.upload(make_msd_dataset(tmp_path / "ds", num_cases=4), "signal-bucket", "ds")
    run_dir, remote = tmp_path / "run", tmp_path / "remote"
    options = [
        "data=msd",
        f"data.root={url}",
        "data.spatial_size=[16,16,8]",
        f"data.remote.cache_dir={remote}",
    ]
    options += ["data.num_workers=0", "model.init_filters=8", "trainer.max_epochs=1", "logger=none"]
    with FaultProxy(s3.endpoint) as proxy:
        # One scan's download stalls part-way, long enough for the signal to arrive during it.
        proxy.add(Fault("stall", path="imagesTr/case_2", after_bytes=100, stall_s=3.0))
        partial = remote / "s3" / "signal-bucket" / "ds" / "imagesTr" / "*" / ".*partial*"
        during_download = plug_callback("sig", "SignalWhenFileAppears", pattern=partial, name="SIGTERM")
        endpoint = f"data.remote.endpoint_url={proxy.url}"
        result = run_cli(
            "seglight.train", *options, endpoint, during_download, f"hydra.run.dir={run_dir}", cache=cache_dir
        )
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert "before training started" in result.stdout + result.stderr
    assert not list(run_dir.glob("checkpoints/*.ckpt"))
    assert not [p for p in remote.rglob("*") if ".partial" in p.name]
    assert status(run_dir) == "interrupted"

    summary = train(compose([*options, "resume=true"], output_dir=run_dir))
    assert summary["status"] == "completed" and damaged_files(run_dir) == []


def test_sigterm_during_the_test_predictions(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    during_test = plug_callback(
        "sig", "SignalWhenFileAppears", pattern=run_dir / "test" / "predictions", name="SIGTERM"
    )
    result = train_cli(run_dir, cache_dir, "trainer.max_epochs=1", "test=true", during_test)
    assert result.returncode == SIGTERM_STATUS, result.stderr[-3000:]
    assert status(run_dir) == "interrupted" and not (run_dir / "test" / "metrics.csv").exists()
    assert damaged_files(run_dir, trackers=False) == []  # no half-written mask under a final name

    summary = train(tiny_config(run_dir, "trainer.max_epochs=1", "test=true", "resume=true"))
    assert summary["status"] == "completed" and (run_dir / "test" / "metrics.csv").is_file()
    assert damaged_files(run_dir) == []
