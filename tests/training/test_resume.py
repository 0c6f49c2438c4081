"""Exact resume: 4 epochs in one go == 2 epochs, then a resume for 2 more (weights, optimizer, curves, best); a
SIGTERM in the middle of an epoch with loader workers, then resume=true (also from SLURM's hpc_ckpt), == no stop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

import seglight
from seglight.train import train
from seglight.training.checkpoints import find_last_checkpoint
from tests.helpers import run_cli, tensorboard_scalars, tiny_config, tiny_overrides

# A schedule that changes the learning rate every epoch: a scheduler reset by the resume would show.
STEP_LR = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.7}


def run(run_dir: Path, *overrides: str) -> dict:
    cfg = tiny_config(run_dir, *overrides)
    with open_dict(cfg):
        cfg.scheduler = {"scheduler": STEP_LR, "interval": "epoch"}
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
    from_checkout = (Path(seglight.__file__).resolve().parents[1] / ".git").exists()
    assert (git is not None) == from_checkout
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


def newest(run_dir: Path) -> dict:
    """The newest last*.ckpt: in a copied run folder, Lightning saves last-v1.ckpt beside the copied last.ckpt."""
    path = find_last_checkpoint(run_dir / "checkpoints")
    return torch.load(path, map_location="cpu", weights_only=True)


# Mid-epoch: 5 training cases in batches of 2 make 3 steps an epoch; SIGTERM after step 4 lands in epoch 2.
WORKERS = ("data.cache=none", "data.num_workers=2")


@pytest.fixture(scope="module")
def stopped_mid_epoch(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    """The same 2-epoch run with 2 loader workers: once without a stop, once stopped by SIGTERM after step 4."""
    root = tmp_path_factory.mktemp("mid-epoch")
    whole, stopped = root / "whole", root / "stopped"
    train(tiny_config(whole, *WORKERS))
    sigterm = "+callbacks.sigterm={_target_:tests.callbacks.SignalAtStep,step:4}"
    result = run_cli("seglight.train", *tiny_overrides(stopped), *WORKERS, sigterm, cache=cache_dir)
    assert result.returncode == 143, result.stderr[-3000:]
    saved = load(stopped)
    assert (saved["epoch"], saved["global_step"]) == (1, 4)  # in the middle of the second epoch
    return whole, stopped


def test_resume_after_sigterm_mid_epoch_with_workers_is_exact(
    stopped_mid_epoch: tuple[Path, Path], tmp_path: Path
) -> None:
    whole, stopped = stopped_mid_epoch
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    train(tiny_config(run_dir, *WORKERS, "resume=true"))
    a, b = load(whole), newest(run_dir)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 6)
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    sessions = json.loads((run_dir / "run_info.json").read_text())["sessions"]
    assert sessions[-1]["resumed_from"].endswith("last.ckpt")


def test_resume_true_picks_up_slurms_hpc_checkpoint(
    stopped_mid_epoch: tuple[Path, Path], tmp_path: Path
) -> None:
    """Lightning's SLURM auto-requeue saves hpc_ckpt_<n>.ckpt in the run folder: it wins over an older last.ckpt."""
    whole, stopped = stopped_mid_epoch
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.ckpt").rename(run_dir / "hpc_ckpt_1.ckpt")  # step 4
    best = next(checkpoints.glob("best-*.ckpt"))  # end of the first epoch, step 3
    shutil.copy(best, checkpoints / "last.ckpt")  # newer file, fewer steps
    train(tiny_config(run_dir, *WORKERS, "resume=true"))
    sessions = json.loads((run_dir / "run_info.json").read_text())["sessions"]
    assert sessions[-1]["resumed_from"] == str(run_dir / "hpc_ckpt_1.ckpt")
    a, b = load(whole), newest(run_dir)
    assert b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
