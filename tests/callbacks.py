"""Callbacks that tests plug into real runs through the config (``+callbacks.<name>={_target_: tests.callbacks...}``).

They observe or act as a user's own callback would; none of them changes what seglight computes.
"""

from __future__ import annotations

import json
import math
import os
import signal
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


class RecordSteps(L.Callback):
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
