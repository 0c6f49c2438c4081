"""Keep a run inside its time budget (``plan=auto plan.time_budget=8m``): the plan sets the epochs from steps it
timed before training; this callback checks them against the epochs as they really run, and moves
``max_epochs`` so that the run ends by its deadline on an epoch that validates (so it ends with its best model).

Measured before training on a machine shared with other work, a step can take several times longer or shorter
than it does later: the epochs the plan set are a start, the run's own epoch and validation times decide.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("seglight")

# Seconds kept free at the end: the last checkpoints, the summary, the progress picture.
END_SECONDS = 5.0
RECENT_EPOCHS = 3  # the epoch time is the median of the last few (the first pays for warm-up and caching)


class TimeBudget(Callback):
    """Ends training by ``deadline`` on an epoch that validates; may lengthen a run without an LR schedule.

    After each epoch (its validation included) the epochs still to run are those whose training (the median of
    the last ``RECENT_EPOCHS`` epochs) and validations (the last one's time) fit before the deadline, rounded down
    to a validating epoch (``check_val_every_n_epoch``). Fewer than planned: ``max_epochs`` comes down. More, and
    ``extend``: it goes up, unless an LR schedule was set for the planned length.

    Args:
        deadline: the wall-clock time (``time.time()``) by which the run should end.
        extend: whether a run that is ahead of its plan may train more epochs than planned.
    """

    def __init__(self, deadline: float, extend: bool = True) -> None:
        self.deadline = float(deadline)
        self.extend = extend
        self._started = 0.0
        self._validation_started = 0.0
        self._validation_s = 0.0  # this epoch's validation
        self._last_validation_s: float | None = None
        self._epochs: list[float] = []  # training time of each epoch, validation left out

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._validation_s = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_s = self._last_validation_s = time.monotonic() - self._validation_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs.append(time.monotonic() - self._started - self._validation_s)
        planned = int(trainer.fit_loop.max_epochs)
        epochs = self.epochs_that_fit(trainer.current_epoch + 1, int(trainer.check_val_every_n_epoch or 1))
        longer = epochs > planned
        if epochs == planned or longer and not (self.extend and not trainer.lr_scheduler_configs):
            return
        trainer.fit_loop.max_epochs = epochs
        if trainer.is_global_zero:
            validation = f", a validation {self._last_validation_s:.1f} s" if self._last_validation_s else ""
            log.info(
                "Time budget: %.0f s left, an epoch takes %.1f s%s: %d epochs in all instead of %d",
                self.deadline - time.time(),
                self.epoch_seconds(),
                validation,
                epochs,
                planned,
            )

    def epoch_seconds(self) -> float:
        """An epoch's training time: the median of the last ``RECENT_EPOCHS``."""
        return float(np.median(self._epochs[-RECENT_EPOCHS:]))

    def epochs_that_fit(self, done: int, interval: int) -> int:
        """The epochs the run should have in all, ``done`` of them run: as many more as fit before the deadline,
        ending on one that validates (``(done + k) % interval == 0``), with the validations among them."""
        epoch_s, validation_s = self.epoch_seconds(), self._last_validation_s or 0.0
        left = self.deadline - time.time() - END_SECONDS
        more = max(0, math.floor(left / max(epoch_s, 1e-6)))
        while more > 0:
            end = done + more
            validations = end // interval - done // interval
            if end % interval == 0 and more * epoch_s + validations * validation_s <= left:
                break
            more -= 1
        return done + more
