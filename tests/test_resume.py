"""Exact resume: 4 epochs in one go == 2 epochs, then a resume for 2 more (weights, optimizer, curves, best)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from seglight.train import train
from tests.helpers import tensorboard_scalars, tiny_config

# A schedule that changes the learning rate every epoch: a scheduler reset by the resume would show.
STEP_LR = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.7}


def run(run_dir: Path, *overrides: str) -> dict:
    cfg = tiny_config(run_dir, *overrides)
    with open_dict(cfg):
        cfg.scheduler = dict(STEP_LR, interval="epoch")
    return train(cfg)


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a nested checkpoint structure, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


# Both loader paths: cached data (batches assembled in a background thread) and uncached (a plain DataLoader).
@pytest.fixture(scope="module", params=["memory", "none"], ids=["cache=memory", "cache=none"])
def both_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    whole, split = root / "whole", root / "split"
    cache = f"data.cache={request.param}"
    run(whole, cache, "trainer.max_epochs=4")
    run(split, cache, "trainer.max_epochs=2")
    run(split, cache, "trainer.max_epochs=4", "ckpt_path=last")  # newest last.ckpt of this run folder
    return whole, split


def load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_two_plus_two_epochs_end_with_identical_weights(both_runs: tuple[Path, Path]) -> None:
    whole, split = (load(d) for d in both_runs)
    assert (whole["epoch"], whole["global_step"]) == (split["epoch"], split["global_step"])
    assert whole["global_step"] > 0
    weights_a, weights_b = whole["state_dict"], split["state_dict"]
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 10
    different = [k for k in weights_a if not torch.equal(weights_a[k], weights_b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # Optimizer moments and LR scheduler continue too, not only the weights.
    moments_a, moments_b = tensors(whole["optimizer_states"]), tensors(split["optimizer_states"])
    assert moments_a.keys() == moments_b.keys() and moments_a
    assert all(torch.equal(moments_a[k], moments_b[k]) for k in moments_a)
    assert whole["lr_schedulers"] == split["lr_schedulers"]
    assert whole["lr_schedulers"][0]["last_epoch"] == 4


def test_resumed_curves_continue_without_gap_or_duplicate(both_runs: tuple[Path, Path]) -> None:
    whole, split = (tensorboard_scalars(d) for d in both_runs)
    assert whole.keys() == split.keys() and {"Loss/train", "Dice/val"} <= whole.keys()
    for tag, points in whole.items():
        assert split[tag] == points, tag  # same steps, each once, with the same values
    steps = [step for step, _ in split["Dice/val"]]
    assert len(steps) == 4 and steps == sorted(set(steps))
    lr = next(tag for tag in split if tag.startswith("lr-"))
    assert [round(v, 8) for _, v in split[lr]] == [round(1e-4 * 0.7**e, 8) for e in range(4)]


def test_best_metric_tracking_survives_the_resume(both_runs: tuple[Path, Path]) -> None:
    whole, split = (json.loads((d / "summary.json").read_text()) for d in both_runs)
    assert split["status"] == "completed" and split["best_dice"] == whole["best_dice"]
    assert split["best_epoch"] == whole["best_epoch"] is not None
    assert Path(split["best_checkpoint"]).name == Path(whole["best_checkpoint"]).name
    # The run folder records both sessions; the second names the checkpoint it continued from.
    sessions = json.loads((both_runs[1] / "run_info.json").read_text())["sessions"]
    assert [s["resumed_from"] is not None for s in sessions] == [False, True]
    assert sessions[1]["resumed_from"].endswith("last.ckpt") and sessions[0]["seed"] == 42
    assert sessions[0]["packages"]["torch"] and sessions[0]["packages"]["lightning"]
    git = sessions[0]["git"]  # None where seglight is not run from a git checkout (a wheel install)
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))


def test_seed_reaches_the_dataloader_workers(tmp_path: Path, cache_dir: Path) -> None:
    """Shuffling and augmentation in worker processes follow ``seed``: same seed, same batches."""

    def batches(seed: int) -> list[torch.Tensor]:
        cfg = tiny_config(tmp_path / "run", "data.cache=none", "data.num_workers=1", f"seed={seed}")
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup("fit")
        assert datamodule.train_dataloader().num_workers == 1
        return [batch["image"] for batch in datamodule.train_dataloader()]

    first, again, other = batches(7), batches(7), batches(8)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
