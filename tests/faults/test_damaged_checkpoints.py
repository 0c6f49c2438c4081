"""A damaged checkpoint is not the end: a last.ckpt cut short, empty or written by another tool is named with the
reason and resume=true falls back to the newest checkpoint of the run that loads; ckpt_path=<that file> refuses
it in one line; a checkpoint of another network or label set is refused before any training starts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from seglight.config.builder import build_module
from seglight.core.errors import ConfigError
from seglight.train import train
from seglight.training.checkpoints import resolve_checkpoint, safe_load
from tests.helpers import tiny_config, tiny_overrides, train_in_process

# What another tool leaves under a checkpoint's name: an HDF5 file (Keras weights), say.
FOREIGN = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8
DAMAGES = {
    "truncated": ("not a readable PyTorch checkpoint", "truncated or damaged"),
    "empty": ("not a readable PyTorch checkpoint", "empty file, 0 bytes"),
    "foreign": ("not a readable PyTorch checkpoint", "another format, not a PyTorch file"),
}


def damage(path: Path, how: str) -> None:
    if how == "truncated":  # a copy cut short, as a kill during a copy or a full disk leaves it
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(FOREIGN)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir


@pytest.mark.parametrize("how", list(DAMAGES))
def test_resume_falls_back_from_a_damaged_last_checkpoint_to_the_newest_that_loads(
    run_copy: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = run_copy / "checkpoints"
    last, best = checkpoints / "last.ckpt", next(checkpoints.glob("best-*.ckpt"))
    damage(last, how)
    module = build_module(tiny_config(run_copy))
    caplog.set_level(logging.INFO, logger="seglight")
    found = resolve_checkpoint(None, True, checkpoints, module, run_dir=run_copy)
    assert found == str(best)
    skipped = next(r.getMessage() for r in caplog.records if str(last) in r.getMessage())
    assert all(words in skipped for words in DAMAGES[how]), skipped
    assert f"continuing from {best}" in caplog.text  # says which

    # ckpt_path=<the damaged file> refuses it, in one line with the reason.
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(str(last), False, checkpoints, module)
    message = str(err.value)
    assert "\n" not in message and str(last) in message and DAMAGES[how][1] in message, message


def test_a_run_whose_last_checkpoint_was_cut_short_resumes_and_finishes(run_copy: Path) -> None:
    checkpoints = run_copy / "checkpoints"
    best = next(checkpoints.glob("best-*.ckpt"))
    damage(checkpoints / "last.ckpt", "truncated")
    summary = train(tiny_config(run_copy, "trainer.max_epochs=3", "resume=true"))
    assert summary["status"] == "completed"
    sessions = json.loads((run_copy / "run_info.json").read_text())["sessions"]
    assert sessions[-1]["resumed_from"] == str(best)
    newest = max(checkpoints.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert safe_load(newest)["global_step"] == 9  # 3 epochs of 3 steps


def test_when_no_checkpoint_loads_resume_refuses_naming_them(run_copy: Path) -> None:
    checkpoints = run_copy / "checkpoints"
    for path in checkpoints.glob("*.ckpt"):
        damage(path, "empty")
    module = build_module(tiny_config(run_copy))
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(None, True, checkpoints, module)
    message = str(err.value)
    assert "\n" not in message and "no checkpoint in" in message and "last.ckpt: " in message, message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("model.init_filters=16", "saved from a different network"),
        ("data.demo.num_labels=2", "trained for other labels (0=background, 1=organ; this run: "),
    ],
    ids=["network", "labels"],
)
def test_a_checkpoint_of_another_network_or_label_set_is_refused_before_training(
    run_copy: Path, override: str, words: str, capsys: pytest.CaptureFixture
) -> None:
    checkpoints = run_copy / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()}
    overrides = [o for o in tiny_overrides(run_copy) if not o.startswith("hydra.")]
    status = train_in_process([*overrides, override, "resume=true"], run_copy)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and message.startswith("seglight.train: error: resume=true"), message
    assert words in message, message
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints.iterdir()} == before  # nothing trained or saved


def test_a_checkpoint_for_other_label_names_is_refused(run_copy: Path, tmp_path: Path) -> None:
    """Same number of labels, other names (another task's model): refused by its saved label names."""
    state = torch.load(run_copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["hyper_parameters"]["label_names"] = {0: "background", 1: "spleen"}
    other = tmp_path / "spleen.ckpt"
    torch.save(state, other)
    module = build_module(tiny_config(run_copy))
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(str(other), False, run_copy / "checkpoints", module)
    assert "trained for other labels (0=background, 1=spleen; this run: 0=background, 1=organ)" in str(
        err.value
    )
