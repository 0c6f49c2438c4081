"""Safe checkpoints: a kill during a write keeps the previous file; bad ckpt_path values get one clear message."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seglight.config.builder import build, build_module
from seglight.core.errors import ConfigError
from seglight.train import train
from seglight.training.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint,
    checkpoint_dir,
    find_last_checkpoint,
    remove_partial_checkpoints,
    resolve_checkpoint,
)
from tests.helpers import REPO, tiny_config

# Saves ever newer versions of a 32 MB checkpoint to one path, as training does with last.ckpt.
WRITER = """
import sys, torch
from seglight.training.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for version in range(10**6):
    io.save_checkpoint({"version": version, "weights": torch.full((8 * 2**20,), float(version))}, path)
    if version == 0:
        print("saved", flush=True)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(last)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert writer.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".last.ckpt.*.partial")):  # a write of a newer version is under way
            assert time.monotonic() < deadline, "no checkpoint write observed"
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGKILL
    partial = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert partial, "the kill came between two writes, not during one"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["weights"].numel() == 8 * 2**20 and bool((state["weights"] == state["version"]).all())
    # The interrupted write left only its temporary file, which the next resume clears away.
    assert find_last_checkpoint(tmp_path) == last
    assert remove_partial_checkpoints(tmp_path) == partial and not list(tmp_path.glob(".*.partial"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    train(tiny_config(run_dir, "trainer.max_epochs=1"))
    return run_dir


def test_trainer_writes_checkpoints_through_the_atomic_io(finished_run: Path) -> None:
    _, _, trainer = build(tiny_config(finished_run))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert "last.ckpt" in names and all(not n.endswith(".partial") for n in names)


def expect_config_error(*words: str, **kwargs) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_checkpoint(**kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_truncated_and_foreign_checkpoints_get_one_clear_message(finished_run: Path, tmp_path: Path) -> None:
    module = build_module(tiny_config(finished_run))
    last = finished_run / "checkpoints" / "last.ckpt"
    assert check_checkpoint(last, module) == str(last)
    common = {"resume": False, "checkpoint_dir": tmp_path, "module": module}

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    expect_config_error(
        "truncated.ckpt", "not a readable PyTorch checkpoint", ckpt_path=str(truncated), **common
    )

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint at all")
    expect_config_error("notes.ckpt", "not a readable PyTorch checkpoint", ckpt_path=str(text), **common)

    plain = tmp_path / "weights.pth"
    torch.save(module.state_dict(), plain)  # a bare state dict, as other frameworks save
    expect_config_error("weights.pth", "not a Lightning checkpoint", ckpt_path=str(plain), **common)

    state = torch.load(last, map_location="cpu", weights_only=True)
    weights_only = tmp_path / "weights-only.ckpt"
    torch.save({k: v for k, v in state.items() if k != "optimizer_states"}, weights_only)
    expect_config_error("weights-only.ckpt", "no training state", ckpt_path=str(weights_only), **common)

    other = build_module(tiny_config(finished_run, "model.init_filters=16"))
    expect_config_error(
        "different network", "of another shape", ckpt_path=str(last), **{**common, "module": other}
    )


def test_last_and_resume_find_the_newest_last_checkpoint(finished_run: Path, tmp_path: Path) -> None:
    _, module, trainer = build(tiny_config(finished_run))
    folder = checkpoint_dir(trainer)
    assert folder == finished_run / "checkpoints"
    last = folder / "last.ckpt"
    assert resolve_checkpoint("last", False, folder, module) == str(last)
    assert resolve_checkpoint(None, True, folder, module) == str(last)
    assert resolve_checkpoint(str(finished_run), False, tmp_path, module) == str(last)  # a run folder
    assert resolve_checkpoint(None, False, folder, module) is None

    newer = tmp_path / "copy" / "last-v1.ckpt"
    newer.parent.mkdir()
    shutil.copy(last, newer.parent / "last.ckpt")
    shutil.copy(last, newer)
    os.utime(newer.parent / "last.ckpt", (1, 1))
    assert find_last_checkpoint(newer.parent) == newer

    empty = tmp_path / "fresh"
    assert resolve_checkpoint(None, True, empty, module) is None  # resume=true: nothing yet, a fresh start
    expect_config_error(
        "ckpt_path=last",
        "no last.ckpt",
        "hydra.run.dir",
        ckpt_path="last",
        **{"resume": False, "checkpoint_dir": empty, "module": module},
    )
    expect_config_error(
        "no such checkpoint",
        ckpt_path=str(tmp_path / "nope.ckpt"),
        resume=False,
        checkpoint_dir=empty,
        module=module,
    )
