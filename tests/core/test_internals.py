"""Each private name of Lightning, Hydra, PyTorch, TensorBoard and W&B that seglight reaches (through
``seglight.core.internals``), tested on its own: an upgrade that removes or renames one fails here, by its name."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from seglight.core.internals import (
    attached_trainer,
    closed_form_lr,
    last_saved_step,
    logged_step,
    mark_sigterm_received,
    reruns_command_line,
    set_last_lr,
    skip_hyperparameter_logging,
    sweep_batches,
    tensorboard_file_writer,
    wandb_init_arguments,
)


class Tiny(L.LightningModule):
    def __init__(self, module_marker: str = "module-marker") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(L.LightningDataModule):
    def __init__(self, data_marker: str = "data-marker") -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.rand(4, 2), batch_size=2)  # two steps an epoch


def trainer(tmp_path: Path, **options) -> L.Trainer:
    defaults = {"logger": False, "enable_checkpointing": False}
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{**defaults, **options},
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> L.Trainer:
    """Two optimiser steps of a tiny model, with a ModelCheckpoint that saves last.ckpt."""
    folder = tmp_path_factory.mktemp("fit")
    saving = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)
    fit = trainer(folder, callbacks=[saving], enable_checkpointing=True)
    fit.fit(Tiny(), datamodule=TinyData())
    return fit


# -- Lightning -------------------------------------------------------------------------------------------------


def test_lightning_module_trainer_attribute(tmp_path: Path) -> None:
    module = Tiny()
    assert attached_trainer(module) is None
    module.trainer = fit = trainer(tmp_path)
    assert attached_trainer(module) is fit


def test_lightning_signal_connector_received_sigterm(tmp_path: Path) -> None:
    fit = trainer(tmp_path)
    assert not fit.received_sigterm
    mark_sigterm_received(fit)
    assert fit.received_sigterm  # what Lightning's loops check after each step


def test_model_checkpoint_last_global_step_saved(fitted: L.Trainer) -> None:
    checkpoint = fitted.checkpoint_callback
    assert hasattr(checkpoint, "_last_global_step_saved")
    assert last_saved_step(checkpoint) == fitted.global_step == 2


def test_epoch_loop_batches_that_stepped(fitted: L.Trainer) -> None:
    assert hasattr(fitted.fit_loop.epoch_loop, "_batches_that_stepped")
    assert logged_step(fitted) == 2


@pytest.mark.parametrize("skipped", [False, True], ids=["logged", "skipped"])
def test_hyperparameters_log_hyperparams_flag(tmp_path: Path, skipped: bool) -> None:
    module, data = Tiny(), TinyData()
    assert hasattr(module, "_log_hyperparams") and hasattr(data, "_log_hyperparams")
    if skipped:
        skip_hyperparameter_logging(module)
        skip_hyperparameter_logging(data)
    logger = CSVLogger(tmp_path)
    trainer(tmp_path, logger=logger).fit(module, datamodule=data)
    saved = Path(logger.log_dir) / "hparams.yaml"
    text = saved.read_text() if saved.is_file() else ""
    assert ("module-marker" in text, "data-marker" in text) == (not skipped, not skipped)


def test_subprocess_script_launcher(tmp_path: Path) -> None:
    # strategy=ddp on two CPU processes, started as a plain script: Lightning runs the command line again.
    assert reruns_command_line(trainer(tmp_path, strategy="ddp", devices=2))
    assert not reruns_command_line(trainer(tmp_path, devices=1))


# -- PyTorch LR schedulers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheduler", "options"),
    [
        (torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": 4}),
        (torch.optim.lr_scheduler.PolynomialLR, {"total_iters": 4, "power": 0.9}),
        (torch.optim.lr_scheduler.StepLR, {"step_size": 1, "gamma": 0.5}),
    ],
)
def test_scheduler_get_closed_form_lr(scheduler: type, options: dict) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = scheduler(optimizer, **options)
    assert hasattr(schedule, "_get_closed_form_lr")
    for _ in range(2):
        optimizer.step()
        schedule.step()
    assert closed_form_lr(schedule) == pytest.approx(schedule.get_last_lr())


def test_scheduler_last_lr() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    set_last_lr(schedule, [0.25])
    assert schedule.get_last_lr() == [0.25]


# -- Hydra -----------------------------------------------------------------------------------------------------


def test_hydra_basic_sweeper_split_arguments() -> None:
    overrides = OverridesParser.create().parse_overrides(["a=1,2", "b=x,y"])
    grid = [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert sweep_batches(overrides, None) == [grid]
    assert sweep_batches(overrides, 3) == [grid[:3], grid[3:]]


# -- trackers --------------------------------------------------------------------------------------------------


def test_tensorboard_summary_writer_get_file_writer(tmp_path: Path) -> None:
    from torch.utils.tensorboard.summary import hparams

    logger = TensorBoardLogger(tmp_path)
    writer = tensorboard_file_writer(logger)
    _, session_start, _ = hparams({"lr": 0.1}, {"Dice/val_best": 0.0})
    writer.add_summary(session_start)
    logger.experiment.flush()
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events and b"lr" in events[0].read_bytes()


def test_wandb_logger_wandb_init(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="seglight-test", save_dir=str(tmp_path), mode="offline")
    arguments = wandb_init_arguments(logger)
    assert arguments is not None and arguments["project"] == "seglight-test" and "anonymous" in arguments
