"""`python -m seglight.train` end to end in a subprocess: events, checkpoints, continuing a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_train_two_epochs_then_continue_from_last_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("seglight.train", "model=segresnet", *tiny_overrides(run_dir), cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "No CUDA GPU found" in out or torch.cuda.is_available()
    assert "trainable parameters" in out and "tensorboard --logdir" in out

    curves = scalars(run_dir)
    assert len(curves["Loss/train"]) == 2 and len(curves["Dice/val"]) == 2
    assert all(0.0 <= v <= 1.0 for _, v in curves["Dice/val"])
    assert any(tag.startswith("lr-") for tag in curves)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "split.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_dice"] == pytest.approx(max(v for _, v in curves["Dice/val"]), abs=1e-6)

    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["optimizer_states"], "optimizer state is saved"

    # Continue the same run for one more epoch from last.ckpt.
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("trainer.max_epochs")]
    result = run_cli(
        "seglight.train", *overrides, "trainer.max_epochs=3", f"ckpt_path={last}", cache=cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] > state["global_step"]
    curves = scalars(run_dir)
    assert [step for step, _ in curves["Dice/val"]] == sorted({step for step, _ in curves["Dice/val"]})
    assert len(curves["Dice/val"]) == 3
