"""Lightning callbacks that make runs survive: preemption, exact resume, and a guard against NaN losses.

They are named entries of ``conf/callbacks/default.yaml`` (drop one with ``~callbacks.<name>``).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from monai.transforms import Compose, Randomizable, Transform
from torch.utils.data import DataLoader

from seglight.checkpointing import checkpoint_dir
from seglight.data.sampling import uses_seeded_sampling
from seglight.errors import ConfigError, SeglightError

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


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run's ``last.ckpt`` goes: the one ModelCheckpoint keeps, else ``checkpoints/last.ckpt``."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.last_model_path:
        return Path(ckpt.last_model_path)
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        path = Path(ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST))
        version = ckpt.STARTING_VERSION
        while path.exists():  # a file of an earlier run in this folder: version it, as ModelCheckpoint does
            path = Path(ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST, ver=version))
            version += 1
        return path
    return checkpoint_dir(trainer) / "last.ckpt"


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Save the full training state as this run's ``last.ckpt`` (through the trainer's atomic CheckpointIO)."""
    path = last_checkpoint_path(trainer)
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint):
        # Recorded before saving, as ModelCheckpoint does, so the checkpoint's own state names this file.
        ckpt.last_model_path = str(path)
    trainer.save_checkpoint(path, weights_only=False)  # everything needed to continue, not just weights
    return path


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
        self._trainer: L.Trainer | None = None
        self._in_group = False  # several processes: stop when they agree (see the class docstring)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        self.signum = None
        self._active = True
        self._trainer = trainer
        self._in_group = False
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
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if first and launcher is not None:
            launcher.kill(signum)  # the processes Lightning's launcher started (none under torchrun or srun)

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        """All processes, after the same step: stop together if any of them was signalled."""
        if not self._in_group:
            return
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            if self.signum is None:
                self.signum = signal.SIGTERM
            # Lightning's own flag (no public setter): its loops raise SIGTERMException after this step.
            trainer._signal_connector.received_sigterm = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
            save_last_checkpoint(trainer)
        self._agree_to_stop(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()  # teardown hooks do not run after an exception
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signum or signal.SIGTERM
        exception.code = interrupted_exit_code(signum)
        name = signal.Signals(signum).name
        if trainer.sanity_checking:
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


class RNGState(Callback):
    """Save every random state a training run draws from in each checkpoint, and restore it on resume.

    Lightning restores weights, optimizer, scheduler, scaler and loop counters, but not random states: without
    this callback a resumed run draws other dropout masks than an uninterrupted one. Saved: Python, NumPy and
    torch (CPU and CUDA). seglight's own training loaders need nothing more: their order and augmentation are a
    function of (seed, epoch, rank, position) and their position is saved by Lightning (see
    ``seglight.data.sampling``), so on the CPU a run resumed at any step, with or without loader workers, ends
    with the same weights as one that was never stopped. For other loaders, each MONAI random transform's own
    state is saved too (exact with ``num_workers=0`` at epoch boundaries; workers are reseeded from the
    restored state: reproducible, not identical). On GPUs, cuDNN's and atomics' non-determinism remains.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loaders = train_loaders(self._trainer) if self._trainer is not None else []
        return capture_rng_state(loaders)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at train start: building the training DataLoader reseeds torch and the transforms (MONAI),
        # and that happens after checkpoint states are loaded.
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loaders = train_loaders(trainer)
        restore_rng_state(state, loaders)
        for loader in loaders:
            if loader.num_workers == 0:
                # On resume Lightning creates the epoch's loader iterator before this hook; an uninterrupted run
                # creates it after, drawing its base seed from the restored state. Do the same draw here, so the
                # shuffle that follows matches. (Workers hold their own states; those cannot be replayed.)
                iter(loader)


def train_loaders(trainer: L.Trainer) -> list[DataLoader]:
    """The training DataLoaders whose transforms keep their own random state (empty before ``fit`` set them up).

    seglight's loaders re-seed their transforms for every sample, so their states need no saving.
    """
    try:
        loaders = trainer.train_dataloader
    except Exception:
        return []
    return [loader for loader in _flatten_loaders(loaders) if not uses_seeded_sampling(loader)]


def _flatten_loaders(obj: Any) -> Iterator[DataLoader]:
    if isinstance(obj, DataLoader):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _flatten_loaders(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _flatten_loaders(value)


def random_transforms_of(loader: DataLoader) -> list[Randomizable]:
    """Every MONAI random transform the loader's dataset applies, in a fixed order (nested ones included)."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, list | tuple):
            for item in obj:
                visit(item)
            return
        if isinstance(obj, Mapping):
            for item in obj.values():
                visit(item)
            return
        if not isinstance(obj, Transform | Compose) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        for value in vars(obj).values():
            visit(value)

    dataset: Any = loader.dataset
    while dataset is not None:  # Subset and other wrappers keep the real dataset in .dataset
        visit(getattr(dataset, "transform", None))
        dataset = getattr(dataset, "dataset", None)
    return found


def capture_rng_state(loaders: list[DataLoader]) -> dict[str, Any]:
    """Python, NumPy, torch (CPU, CUDA) and MONAI transform random states, as plain tensors and numbers.

    Plain types keep checkpoints loadable with ``torch.load(weights_only=True)``, as Lightning loads them.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "transforms": [
            _numpy_state(t.R.get_state()) for loader in loaders for t in random_transforms_of(loader)
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], loaders: list[DataLoader]) -> None:
    """Set the random states that ``capture_rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    transforms = [t for loader in loaders for t in random_transforms_of(loader)]
    saved = state.get("transforms", [])
    if len(saved) != len(transforms):
        log.warning(
            "The checkpoint holds %d random transform states but the training data now has %d random "
            "transforms: augmentations continue from fresh random states.",
            len(saved),
            len(transforms),
        )
        return
    for transform, transform_state in zip(transforms, saved, strict=True):
        transform.R.set_state(_numpy_tuple(transform_state))


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(cached_gaussian),
    }


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["gauss"])


class NonFiniteLossError(SeglightError):
    """The training loss became NaN or Inf."""


class NaNGuard(Callback):
    """Stop at the first NaN or Inf training loss, before it reaches a checkpoint.

    The message names the step, the last good checkpoint (left as it was) and the usual fixes. Reading the loss
    back would make the host wait for the GPU at every step, so each step's check (loss, and input values) is
    computed on the device and copied back without waiting; it is read once it has arrived, at a later step,
    and always before a checkpoint is written, before validation and at the end of an epoch. On the CPU the check
    is read at once, before the backward pass, so the weights in memory are still the last finite ones; on a GPU
    a step or two may have run before the stop, and none of it is saved.
    """

    def __init__(self) -> None:
        self._batch: Any = None
        self._batch_idx = 0
        self._pending: deque[_StepCheck] = deque()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None  # do not keep a batch alive between steps

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach()).all().reshape(1)
        # Where the check is read later, the batch is gone by then: which inputs were finite travels with it.
        deferred = finite.device.type != "cpu"
        inputs = _input_checks(self._batch) if deferred else {}
        flags = torch.cat([finite, *inputs.values()]) if inputs else finite
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        names = {key: _case_names(self._batch, key, len(value)) for key, value in inputs.items()}
        self._pending.append(_StepCheck(_Readback(flags), where, list(inputs), names))
        self._raise_if_bad(trainer, loss, wait=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_bad(trainer, wait=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_bad(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_bad(trainer, wait=True)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Raised before the file is written: a checkpoint never holds weights that a non-finite step touched.
        self._raise_if_bad(trainer, wait=True)

    def _raise_if_bad(self, trainer: L.Trainer, loss: torch.Tensor | None = None, wait: bool = False) -> None:
        """Read the checks that have arrived (all of them with ``wait``); raise at the first non-finite loss."""
        while self._pending and (wait or self._pending[0].flags.ready()):
            check = self._pending.popleft()
            flags = check.flags.value().tolist()  # a host tensor by now: nothing waits here
            if flags[0]:
                continue
            self._pending.clear()
            bad_input = check.bad_inputs(flags[1:]) if check.keys else self._non_finite_inputs()
            raise NonFiniteLossError(self.describe(trainer, loss, check.where, bad_input))

    def describe(
        self,
        trainer: L.Trainer,
        loss: torch.Tensor | None = None,
        where: str | None = None,
        bad_input: str | None = None,
    ) -> str:
        """The one-line report: what, where, which checkpoint is safe, what to try."""
        value = "NaN" if loss is None or bool(torch.isnan(loss.detach()).any()) else "Inf"
        if loss is None or loss.device.type != "cpu":
            value = "NaN or Inf"  # the check came back as one flag; the loss itself is gone
        where = where or (
            f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        )
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or ""
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint had been saved yet"
        precision = str(trainer.precision)
        if precision.startswith("16"):
            fix = (
                f"trainer.precision={precision} overflows easily: use trainer.precision=bf16-mixed "
                "(GPUs with bfloat16) or trainer.precision=32, or lower optimizer.lr"
            )
        else:
            fix = (
                "lower optimizer.lr; with 16-bit mixed precision use trainer.precision=bf16-mixed or "
                "trainer.precision=32"
            )
        if bad_input is None:
            bad_input = self._non_finite_inputs()
        if bad_input:
            fix = f"the input batch itself has NaN/Inf values ({bad_input}): check those images"
        return (
            f"training loss is {value} at {where}; training stopped and {kept}. Fix: {fix}. "
            "To find the operation that produced it: +trainer.detect_anomaly=true"
        )

    def _non_finite_inputs(self) -> str:
        """Which input of the current batch has NaN/Inf values, and in which cases; '' if all are finite."""
        batch = self._batch
        if not isinstance(batch, Mapping):
            return ""
        for key, value in batch.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or bool(
                torch.isfinite(value).all()
            ):
                continue
            bad = [i for i in range(value.shape[0]) if not bool(torch.isfinite(value[i]).all())]
            names = getattr(value, "meta", {}).get("filename_or_obj") or batch.get("case_id") or []
            names = [str(names[i]) for i in bad if isinstance(names, list | tuple) and i < len(names)]
            return f"'{key}'" + (f" of {', '.join(names)}" if names else "")
        return ""


class _Readback:
    """A small device tensor on its way to the host: ``ready`` asks without waiting, ``value`` waits."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: Any = None
        if tensor.device.type == "cuda":
            self.host = tensor.to("cpu", non_blocking=True)  # pinned, queued behind the step's kernels
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.cpu()  # the CPU (nothing to wait for) or a device without events

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def value(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class _StepCheck:
    """One training step's finiteness flags (loss first, then each input's cases) and where the step was."""

    def __init__(self, flags: _Readback, where: str, keys: list[str], names: dict[str, list[str]]) -> None:
        self.flags, self.where, self.keys, self.names = flags, where, keys, names

    def bad_inputs(self, item_flags: list[bool]) -> str:
        """Which input had NaN/Inf values, and in which cases; '' when all were finite."""
        offset = 0
        for key in self.keys:
            names = self.names[key]
            flags = item_flags[offset : offset + len(names)]
            offset += len(names)
            bad = [name for name, ok in zip(names, flags, strict=True) if not ok]
            if bad:
                named = [n for n in bad if n]
                return f"'{key}'" + (f" of {', '.join(named)}" if named else "")
        return ""


def _input_checks(batch: Any) -> dict[str, torch.Tensor]:
    """Per case, whether each floating-point input of the batch is finite (device tensors, nothing read back)."""
    if not isinstance(batch, Mapping):
        return {}
    return {
        key: torch.isfinite(value.detach()).flatten(1).all(1)
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim > 1
    }


def _case_names(batch: Any, key: str, count: int) -> list[str]:
    """Names of the batch's cases: files from MONAI metadata, else case ids, else ''."""
    value = batch.get(key) if isinstance(batch, Mapping) else None
    names = getattr(value, "meta", {}).get("filename_or_obj") if value is not None else None
    names = names or (batch.get("case_id") if isinstance(batch, Mapping) else None) or []
    if not isinstance(names, list | tuple):
        names = []
    return [str(names[i]) if i < len(names) else "" for i in range(count)]


class InjectNaN(Callback):
    """Debugging aid: the network's output becomes NaN at one training step, as in a 16-bit overflow.

    Exercises ``NaNGuard`` and recovery from the last checkpoint:
    ``+callbacks.inject_nan={_target_:seglight.callbacks.InjectNaN,at_step:5}``.
    """

    def __init__(self, at_step: int) -> None:
        self.at_step = int(at_step)
        self._armed = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._armed or trainer.global_step != self.at_step:
            return
        self._armed = False
        network = getattr(pl_module, "net", pl_module)

        def overflow(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            handle.remove()  # one forward pass only
            return output * math.nan

        handle = network.register_forward_hook(overflow)
