"""What every configured tracker records besides the curves: the config, the run's settings, the best Dice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from seglight.core.internals import logged_step, skip_hyperparameter_logging
from seglight.training.trackers import BEST_DICE, flatten, is_mlflow, write_hparams_session


class ExperimentTracking(Callback):
    """What every configured tracker records besides the curves, on rank 0.

    At the start: the composed config (the network as built, ``auto`` values filled in) as hyperparameters; for
    TensorBoard also the run's main settings (``run_settings``) as an HParams session, so ``tensorboard --logdir
    outputs/train/runs`` compares the runs of a sweep in one table against their best Dice. After each
    validation: ``Dice/val_best``, the best ``Dice/val`` so far (saved in checkpoints, so it survives a resume).
    """

    def __init__(self, config: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.settings = dict(settings)
        self.best: float | None = None

    @property
    def state_key(self) -> str:
        return "ExperimentTracking"

    def state_dict(self) -> dict[str, Any]:
        return {"best_dice": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best_dice")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # This callback logs the whole composed config instead of Lightning's merge of the module's and the data
        # module's saved arguments (what save_hyperparameters(logger=False) would say in each of them).
        skip_hyperparameter_logging(pl_module)
        if trainer.datamodule is not None:
            skip_hyperparameter_logging(trainer.datamodule)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        config = dict(self.config)
        net = getattr(pl_module, "hparams", {}).get("net")
        if isinstance(net, Mapping):
            config["model"] = dict(net)  # what was built, with the sizes taken from the data
        settings = {**self.settings, "trainer.precision": str(trainer.precision)}
        for logger in trainer.loggers:
            if is_mlflow(logger):
                # MLflow params are flat; the command line's dotted names let a reader repeat a run.
                logger.log_hyperparams(flatten(config))
            else:
                logger.log_hyperparams(config)  # TensorBoard and CSV: hparams.yaml; W&B: the run's config
            if isinstance(logger, TensorBoardLogger):
                write_hparams_session(logger, settings)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        dice = trainer.callback_metrics.get("Dice/val")
        if dice is None:
            return
        self.best = float(dice) if self.best is None else max(self.best, float(dice))
        # The step Lightning logs this validation's metrics at, so the curves line up in every tracker.
        step = logged_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics({BEST_DICE: self.best}, step=step)
