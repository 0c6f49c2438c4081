"""One line per epoch and per validation where the output goes to a log (CI, nohup, SLURM, CloudWatch)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from seglight.core.console import FILE_ONLY
from seglight.data.sampling import is_placeholder

log = logging.getLogger("seglight")


class EpochLog(Callback):
    """One line per epoch, and one per validation, through the ``seglight`` logger (rank 0).

    ``Epoch 3/10 Loss/train=0.2789 Dice/val=0.7845 Dice/val/organ=0.8012 Dice/val/cyst=0.7678 HD95/val=4.21
    lr=1.00e-04 time=12.3s eta=1m26s``: per-label Dice with several labels, HD95/NSD when computed, the learning
    rate at the epoch's start, the epoch's wall time (validation included) and the time left at this session's
    mean epoch time. Epochs count from 1 here (checkpoint names count from 0, as Lightning does). A validation adds
    ``Validation 3/10: 6 cases in 1.4s`` before its epoch's line. With ``console=False`` (a progress bar shows
    the same) the lines go to the log file only.
    """

    VALIDATION_METRICS = ("Dice/val", "HD95/val", "NSD/val")

    def __init__(self, console: bool = True) -> None:
        self.console = console
        self._epoch_started = 0.0
        self._durations: list[float] = []
        self._lr: float | None = None
        self._validation: dict[str, float] = {}
        self._val_started = 0.0
        self._val_cases = 0

    def _emit(self, trainer: L.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            log.info(message, extra={FILE_ONLY: not self.console})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.monotonic()
        self._validation = {}
        optimizers = trainer.optimizers
        self._lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_started = time.monotonic()
        self._val_cases = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if is_placeholder(batch):
            return  # a placeholder that evens out the processes' validation steps under DDP: no case
        image = batch.get("image") if isinstance(batch, dict) else None
        self._val_cases += len(image) if image is not None else 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._validation = {
            name: float(value)
            for name, value in metrics.items()
            if any(name == m or name.startswith(m + "/") for m in self.VALIDATION_METRICS)
        }
        cases = f"{self._val_cases} case{'s' if self._val_cases != 1 else ''}"
        if trainer.world_size > 1:
            cases += " on rank 0"
        elapsed = time.monotonic() - self._val_started
        self._emit(trainer, f"Validation {self._epoch_label(trainer)}: {cases} in {duration(elapsed)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.monotonic() - self._epoch_started
        self._durations.append(elapsed)
        parts = [f"Epoch {self._epoch_label(trainer)}"]
        loss = trainer.callback_metrics.get("Loss/train")
        if loss is not None:
            parts.append(f"Loss/train={float(loss):.4f}")
        parts.extend(self._validation_fields())
        if self._lr is not None:
            parts.append(f"lr={self._lr:.2e}")
        parts.append(f"time={duration(elapsed)}")
        left = self._epochs_left(trainer)
        if left is not None:
            parts.append(f"eta={duration(left * sum(self._durations) / len(self._durations))}")
        self._emit(trainer, " ".join(parts))

    def _validation_fields(self) -> list[str]:
        values = self._validation
        fields = []
        for name in self.VALIDATION_METRICS:
            if name in values:
                digits = 2 if name.startswith("HD95") else 4
                fields.append(f"{name}={values[name]:.{digits}f}")
            per_label = sorted(k for k in values if k.startswith(name + "/"))
            if len(per_label) > 1:  # one foreground label: its value is the mean already shown
                digits = 2 if name.startswith("HD95") else 4
                fields.extend(f"{k}={values[k]:.{digits}f}" for k in per_label)
        return fields

    @staticmethod
    def _epoch_label(trainer: L.Trainer) -> str:
        total = trainer.max_epochs
        number = trainer.current_epoch + 1
        return f"{number}/{total}" if total is not None and total > 0 else str(number)

    @staticmethod
    def _epochs_left(trainer: L.Trainer) -> int | None:
        total = trainer.max_epochs
        if total is None or total < 0:
            return None
        return max(0, total - trainer.current_epoch - 1)


def duration(seconds: float) -> str:
    """A short wall time without spaces (so a log line splits on spaces): ``12.3s``, ``4m05s``, ``2h03m``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
