"""The training progress plot (loss, Dice, learning rate per epoch), redrawn after every epoch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from seglight.visualization.figures import PROGRESS_SERIES, progress_figure, save_figure

log = logging.getLogger("seglight")


class ProgressPlot(L.Callback):
    """Writes ``progress.png`` (training loss, Dice/val, learning rate per epoch) into the run folder at the end.

    The history travels in checkpoints, so a resumed run plots all its epochs.

    Args:
        dirpath: folder for the picture (default: the trainer's ``default_root_dir``).
        filename: the picture's name.
    """

    SERIES = PROGRESS_SERIES

    def __init__(self, dirpath: str | None = None, filename: str = "progress.png") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.history: dict[str, dict[int, float]] = {name: {} for name in self.SERIES}

    def _record(self, name: str, epoch: int, value: Any) -> None:
        if value is not None:
            self.history[name][int(epoch)] = float(value)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.optimizers:  # the rate this epoch trains with
            self._record("lr", trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record("Loss/train", trainer.current_epoch, trainer.callback_metrics.get("Loss/train"))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name in ("Dice/val", "Loss/val"):
            self._record(name, trainer.current_epoch, trainer.callback_metrics.get(name))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            path = Path(self.dirpath or trainer.default_root_dir) / self.filename
            save_figure(progress_figure(self.history), path)
            log.info("Training progress: %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {name: dict(values) for name, values in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, values in state_dict.get("history", {}).items():
            self.history.setdefault(name, {}).update({int(k): float(v) for k, v in values.items()})
