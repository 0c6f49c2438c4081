"""Callbacks that tests plug into real runs through the config (``+callbacks.<name>={_target_: tests.callbacks...}``).

They observe or act as a user's own callback would; none of them changes what seglight computes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class RecordSamples(L.Callback):
    """Writes ``<dirpath>/samples-rank<r>-<stage>.json``: the cases of every training step with whether each was
    flipped, and the cases each validation step scored (placeholders as "").

    A flip is told by comparing the batch with the case's cached, unaugmented volume (``data.cache=memory``).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.train: list[list[Any]] = []
        self.val: list[list[Any]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        cached = {item["case_id"]: item["image"] for item in trainer.datamodule.train_ds.data}
        for i, case in enumerate(batch["case_id"]):
            image, reference = batch["image"][i].cpu(), cached[case]
            flipped = (
                False
                if torch.equal(image, reference)
                else True
                if torch.equal(image, torch.flip(reference, dims=[1]))
                else None
            )
            self.train.append([trainer.current_epoch, trainer.global_step, case, flipped])

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.val.append([trainer.current_epoch, *batch["case_id"]])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "train": self.train,
            "val": self.val,
        }
        (
            self.dirpath / f"samples-rank{trainer.global_rank}-{getattr(stage, 'value', stage)}.json"
        ).write_text(json.dumps(record))


class SignalAtStep(L.Callback):
    """Sends the signal ``name`` to this process once, right after the optimizer step that makes ``global_step == step``."""

    def __init__(self, step: int, name: str = "SIGTERM") -> None:
        self.step = int(step)
        self.signum = getattr(signal, name)
        self._sent = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._sent and trainer.global_step == self.step:
            self._sent = True
            os.kill(os.getpid(), self.signum)


class InjectNaN(Callback):
    """Debugging aid: the network's output becomes NaN at one training step, as in a 16-bit overflow.

    Exercises ``NaNGuard`` and recovery from the last checkpoint:
    ``+callbacks.inject_nan={_target_:tests.callbacks.InjectNaN,at_step:5}``.
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


class SignalInHook(L.Callback):
    """Sends the signal ``name`` to this process from inside a hook, the first time it runs at ``step`` or later.

    ``hook``: ``setup`` (after the data is set up), ``on_train_start`` (the first epoch's set-up done),
    ``on_before_optimizer_step`` (in the middle of a step: backward done, weights not yet updated),
    ``on_validation_batch_start`` (during a validation, the sanity check aside) or ``on_save_checkpoint`` (while
    a checkpoint is being saved). ``times``: how many signals (a second SIGTERM, say).
    """

    HOOKS = ("setup", "on_train_start", "on_before_optimizer_step", "on_validation_batch_start")
    HOOKS += ("on_save_checkpoint",)

    def __init__(self, hook: str, name: str = "SIGKILL", step: int = 0, times: int = 1) -> None:
        if hook not in self.HOOKS:
            raise ValueError(f"hook must be one of {self.HOOKS}, got {hook!r}")
        self.hook = hook
        self.signum = getattr(signal, name)
        self.step = int(step)
        self.times = int(times)
        self._sent = False

    def _maybe(self, trainer: L.Trainer, hook: str) -> None:
        if self._sent or hook != self.hook or trainer.sanity_checking or trainer.global_step < self.step:
            return
        self._sent = True
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._maybe(trainer, "setup")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe(trainer, "on_train_start")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self._maybe(trainer, "on_before_optimizer_step")

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._maybe(trainer, "on_validation_batch_start")

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._maybe(trainer, "on_save_checkpoint")


class SignalWhenFileAppears(L.Callback):
    """Sends the signal ``name`` to this process as soon as a file matching ``pattern`` (a glob) exists.

    A thread started with the run (when the callback is built, before the data is set up) watches for it: the
    temporary file of a checkpoint write (``<run>/checkpoints/.*.partial``), of a cache entry or a download, or
    the folder of the test predictions. ``times`` signals are sent, ``gap_s`` apart.
    """

    def __init__(self, pattern: str, name: str = "SIGKILL", times: int = 1, gap_s: float = 0.05) -> None:
        self.pattern = str(pattern)
        self.signum = getattr(signal, name)
        self.times = int(times)
        self.gap_s = float(gap_s)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        parts = Path(self.pattern).parts
        fixed = next(i for i, part in enumerate([*parts, "*"]) if any(c in part for c in "*?["))
        folder, rest = Path(*parts[:fixed]), "/".join(parts[fixed:])
        while not (any(folder.glob(rest)) if rest else folder.exists()):
            time.sleep(0.001)
        for number in range(self.times):
            if number:
                time.sleep(self.gap_s)
            os.kill(os.getpid(), self.signum)


class RecordSteps(L.Callback):
    """Appends each finished optimizer step's ``global_step`` to ``path``, flushed to disk at once: after a kill,
    the file says how far the run got."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step}\n")
            handle.flush()
            os.fsync(handle.fileno())


class CheckCachedData(L.Callback):
    """Checks that the cases this run reads from the shared caches are its own: every validation case's cached
    item has the content hash of the case preprocessed afresh from its files (no cache), at the start of training
    and after every validation. Writes ``{"checked": n, "mismatches": [...]}`` to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.checked = 0
        self.mismatches: list[str] = []

    def _check(self, trainer: L.Trainer) -> None:
        from monai import transforms as mt

        from seglight.data.caching.datasets import split_pipeline

        datamodule = trainer.datamodule
        dataset = datamodule.val_ds
        deterministic, _ = split_pipeline(mt.Compose(datamodule.transforms(train=False).transforms))
        for index in range(len(dataset)):
            cached = dataset[index]
            fresh = deterministic(dict(dataset.data[index]))
            for key in ("image", "label"):
                if _digest(cached[key]) != _digest(fresh[key]):
                    self.mismatches.append(f"{dataset.data[index].get('case_id')}: {key}")
            self.checked += 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"checked": self.checked, "mismatches": self.mismatches}))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)


def _digest(value: Any) -> str:
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class RecordStepTensors(L.Callback):
    """Keeps what each training step saw and computed: a copy of its batch's tensors and its loss, and torch's
    random state at the first step (which dropout draws from), so a plain loop can repeat the run."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.rng_state: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.rng_state is None:
            self.rng_state = torch.get_rng_state()
        self.batches.append({k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(outputs["loss"].detach().clone())
