"""Survive SIGTERM and SIGINT (spot reclaim, ``scancel``, Ctrl-C): finish the step, save ``last.ckpt``, exit 128+signal."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from seglight.core.errors import ConfigError
from seglight.core.internals import mark_sigterm_received
from seglight.training.checkpoints import save_last_checkpoint

log = logging.getLogger("seglight")

INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Put the SIGTERM/SIGINT handlers back as they were when the block ends, however it ends.

    Lightning restores the handlers it found when a fit ends, but after an exception those are Preemption's (it
    installs them first); a run inside a sweep or a notebook must leave the process as it found it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def interrupted_exit_code(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + int(signum)


@contextmanager
def stop_at_signals() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT stop the work at once with exit status 143/130 (``SIGTERMException``).

    For the work around the training loop (building the data, downloads, filling caches, the test predictions),
    where no step is half done and nothing needs saving; inside the loop, ``Preemption`` takes over and finishes
    the step first. Signals after the first are noted and ignored, so the clean-up after it completes. The
    handlers found are put back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("Received %s again: already stopping.", name)
            return
        received.append(signum)
        log.warning("Received %s: stopping now; exit status %d.", name, interrupted_exit_code(signum))
        raise SIGTERMException(interrupted_exit_code(signum))

    with signal_handlers_kept():
        for signum in INTERRUPT_SIGNALS:
            signal.signal(signum, stop)
        yield


class Preemption(Callback):
    """Survive SIGTERM and SIGINT (spot reclaim, ``scancel``, Ctrl-C): finish the step, save, exit 128+signal.

    Lightning already turns SIGTERM into an exception raised at the next step boundary; this callback also
    routes the first Ctrl-C there (a second one stops at once, without saving), saves ``last.ckpt`` when that
    exception passes, and sets the exit status to 143 (SIGTERM) or 130 (SIGINT). A SIGKILL cannot be caught:
    ``every_n_train_steps`` bounds what it can lose by also refreshing ``last.ckpt`` every N optimizer steps.

    With several processes (DDP, FSDP), the signal handler only takes note (and passes the signal on to the
    processes Lightning's launcher started): a collective inside a signal handler, as Lightning's own does, can
    pair with another process's gradient all-reduce and hang, and a second signal to the same process (Ctrl-C
    reaches every process, and the launcher forwards it again) adds a collective the others never make. The
    processes instead agree after every training step and epoch, all together, whether any of them was
    signalled; then Lightning stops all of them after that same step and each saves its part of ``last.ckpt``.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ConfigError(
                f"callbacks.preemption.every_n_train_steps must be at least 1 (or null), got {every_n_train_steps}"
            )
        self.every_n_train_steps = int(every_n_train_steps) if every_n_train_steps else None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._active = False
        self._fitting: L.Trainer | None = None  # the trainer of the fit under way
        self._in_group = False  # several processes: stop when they agree (see the class docstring)
        self._training_started = False
        self._save_at_epoch_end = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        self.signum = None
        self._active = True
        self._fitting = trainer
        self._in_group = False
        self._training_started = False
        # Installed before Lightning's own SIGTERM handler, which then calls this one after setting its flag.
        self._previous = {signum: signal.getsignal(signum) for signum in INTERRUPT_SIGNALS}
        for signum in INTERRUPT_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._active:
            # Still installed after the fit ended (after an exception, Lightning's teardown puts back the handlers
            # it found, this one among them): hand the signal to what was there before.
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            log.warning("Second Ctrl-C: stopping at once, without saving.")
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning(
                "Received %s: finishing the current step, then saving last.ckpt and stopping%s.",
                signal.Signals(signum).name,
                " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "",
            )
        if signum == signal.SIGINT:
            # Let Lightning's SIGTERM handling stop the loops at the next step boundary: a KeyboardInterrupt
            # raised mid-step could leave an optimizer step half applied, and that state must not be saved.
            signal.raise_signal(signal.SIGTERM)

    def _restore_handlers(self) -> None:
        if self._active:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._active = False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_in_group(trainer)
        self._forward_early_signal(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training_started = True
        self._take_over_in_group(trainer)
        self._forward_early_signal(trainer)

    def _take_over_in_group(self, trainer: L.Trainer) -> None:
        # Lightning has just installed its SIGTERM handler (it does so right before the loops): with several
        # processes, replace it by one that makes no collective call (see the class docstring).
        if trainer.world_size > 1 and self._active and threading.current_thread() is threading.main_thread():
            self._in_group = True
            signal.signal(signal.SIGTERM, self._on_signal_in_group)

    def _on_signal_in_group(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self._on_signal(signum, frame)
        launcher = getattr(self._fitting.strategy, "launcher", None) if self._fitting is not None else None
        if first and launcher is not None:
            launcher.kill(signum)  # the processes Lightning's launcher started (none under torchrun or srun)

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        """All processes, after the same step: stop together if any of them was signalled."""
        if not self._in_group:
            return
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            if self.signum is None:
                self.signum = signal.SIGTERM
            mark_sigterm_received(trainer)  # Lightning's loops raise SIGTERMException after this step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            save_last_checkpoint(trainer)
        self._agree_to_stop(trainer)

    def _forward_early_signal(self, trainer: L.Trainer) -> None:
        # A signal that came while the trainer was still setting up, before Lightning had its SIGTERM handler
        # in place (it installs it just before the loops start): hand it on now that the handler is there.
        # With several processes, the next step's agreement picks it up.
        if self.signum is not None and not trainer.received_sigterm and not self._in_group:
            signal.raise_signal(signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            if batch_idx + 1 == trainer.num_training_batches:
                # Saved after an epoch's last batch but before its end, a checkpoint resumes without that epoch's
                # validation and with the epoch count behind (a later resume then repeats steps): saved at the
                # epoch's end instead, after its validation.
                self._save_at_epoch_end = True
            else:
                save_last_checkpoint(trainer)
        self._agree_to_stop(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Teardown hooks do not run after an exception: the handlers go back here, once last.ckpt is saved (a
        # second SIGTERM during the save is then only noted, and the save completes).
        try:
            self._stop(trainer, exception)
        finally:
            self._restore_handlers()

    def _stop(self, trainer: L.Trainer, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signum or _signal_of(exception)
        exception.code = interrupted_exit_code(signum)
        name = signal.Signals(signum).name
        if trainer.sanity_checking or not self._training_started:
            # No training step ran in this session: the checkpoint on disk (if any) already holds this state.
            log.warning("Interrupted by %s before training started; exit status %d.", name, exception.code)
            return
        path = save_last_checkpoint(trainer)
        if not trainer.is_global_zero:
            return  # every process saved its part; rank 0 reports
        log.warning(
            "Interrupted by %s at step %d (epoch %d): saved %s; exit status %d. Continue with: "
            "python -m seglight.train hydra.run.dir=%s resume=true",
            name,
            trainer.global_step,
            trainer.current_epoch,
            path,
            exception.code,
            trainer.default_root_dir,
        )


def _signal_of(exception: SIGTERMException) -> int:
    """The signal behind a ``SIGTERMException``: the one its exit status names (``stop_at_signals``), else SIGTERM."""
    code = exception.code
    if isinstance(code, int) and code - 128 in (int(s) for s in INTERRUPT_SIGNALS):
        return code - 128
    return int(signal.SIGTERM)
