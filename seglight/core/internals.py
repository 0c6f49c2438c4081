"""The one module that reaches into private names of Lightning, Hydra, PyTorch, TensorBoard and W&B.

Each access is one small function named for what it does, with a test of its own in
``tests/core/test_internals.py``: when an upgrade removes or renames one of these names, that test fails and
names it, instead of a run failing somewhere else. No other seglight module touches them (``tests/test_layers.py``).

Hydra imports ``seglight.config.sweeps``, and so this module, whenever any Hydra app starts (its plugin scan):
nothing here imports torch or Lightning at the top, so ``python -m seglight.check --help`` does not pay for them.
The one function that needs a private Lightning class imports it where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

if TYPE_CHECKING:
    import lightning as L
    from hydra.core.override_parser.types import Override
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


# -- Lightning -------------------------------------------------------------------------------------------------


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or None (Lightning's ``module.trainer`` raises when there is none)."""
    return module._trainer


def mark_sigterm_received(trainer: L.Trainer) -> None:
    """Set Lightning's own SIGTERM flag (it has no public setter): its loops raise SIGTERMException after this step."""
    trainer._signal_connector.received_sigterm = True


def last_saved_step(checkpoint: ModelCheckpoint) -> int | None:
    """The global step at which ``checkpoint`` (a ModelCheckpoint) last saved, or None if Lightning does not say."""
    return getattr(checkpoint, "_last_global_step_saved", None)


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs metrics at now (optimiser steps taken, gradient accumulation counted once)."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def skip_hyperparameter_logging(module: L.LightningModule | L.LightningDataModule) -> None:
    """Keep Lightning from logging what ``module`` saved with ``save_hyperparameters`` (as ``logger=False`` would)."""
    module._log_hyperparams = False


def reruns_command_line(trainer: L.Trainer) -> bool:
    """Whether Lightning starts the other processes of this node by running the command line again.

    That is its subprocess-script launcher (``strategy=ddp`` started as a plain script) with more than one
    process, unless a cluster (torchrun, SLURM) starts the processes itself.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    )


# -- PyTorch LR schedulers -------------------------------------------------------------------------------------


def closed_form_lr(scheduler: Any) -> list[float] | None:
    """The learning rates of a scheduler's formula at its current epoch or step, or None if it has no formula.

    CosineAnnealingLR, PolynomialLR, StepLR and others compute them from ``last_epoch`` alone.
    """
    if not hasattr(scheduler, "_get_closed_form_lr"):
        return None
    return [float(rate) for rate in scheduler._get_closed_form_lr()]


def set_last_lr(scheduler: Any, rates: Sequence[float]) -> None:
    """Make ``scheduler.get_last_lr()`` (what Lightning's LearningRateMonitor reads) return ``rates``."""
    scheduler._last_lr = list(rates)


# -- Hydra -----------------------------------------------------------------------------------------------------


def sweep_batches(overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
    """The grid of a sweep's overrides as Hydra's basic sweeper makes it: batches of jobs, each a list of overrides."""
    return BasicSweeper.split_arguments(overrides, max_batch_size)


# -- trackers --------------------------------------------------------------------------------------------------


def tensorboard_file_writer(logger: TensorBoardLogger) -> Any:
    """The event-file writer behind a TensorBoardLogger's SummaryWriter, which takes raw summaries (``add_summary``)."""
    return logger.experiment._get_file_writer()


def wandb_init_arguments(logger: WandbLogger) -> dict[str, Any] | None:
    """The arguments a WandbLogger will pass to ``wandb.init`` (a dict that may be edited before the run starts)."""
    arguments = getattr(logger, "_wandb_init", None)
    return arguments if isinstance(arguments, dict) else None
