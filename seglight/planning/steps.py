"""Real training steps and validations of a ``SegModule`` on random data, shared by the memory and time tests.

A step is the module's own ``training_step`` (network, loss) with its own optimiser, at the trainer's precision;
a validation is its own ``validation_step`` on one whole volume (sliding windows in patch mode, metrics included).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

# Lightning's notice when a step logs outside a Trainer, which these steps do on purpose.
_NO_TRAINER = r"You are trying to `self.log\(\)` but the `self.trainer` reference is not registered"


@dataclass(frozen=True)
class Precision:
    """How a Lightning ``trainer.precision`` runs: autocast dtype, loss scaling, parameter dtype."""

    name: str
    autocast: torch.dtype | None
    scaler: bool
    parameters: torch.dtype
    activation_bytes: float  # bytes per activation value saved for backward, relative to float32

    @classmethod
    def of(cls, precision: Any) -> Precision:
        """The precision named as Lightning names it (``16-mixed``, ``bf16-mixed``, ``32``, ``32-true``...)."""
        name = str(precision).lower()
        if name in ("16-mixed", "16"):
            return cls(name, torch.float16, True, torch.float32, MIXED_ACTIVATIONS)
        if name == "bf16-mixed":
            return cls(name, torch.bfloat16, False, torch.float32, MIXED_ACTIVATIONS)
        if name == "16-true":
            return cls(name, None, False, torch.float16, 0.5)
        if name == "bf16-true":
            return cls(name, None, False, torch.bfloat16, 0.5)
        if name in ("64", "64-true"):
            return cls(name, None, False, torch.float64, 2.0)
        return cls(name, None, False, torch.float32, 1.0)

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast region of a step (none at full precision)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


# Under 16-bit mixed precision most saved activations are 16-bit (convolution outputs), but normalisation and
# loss inputs stay 32-bit under autocast: about 0.6 of the 32-bit bytes, to be checked by the calibration.
MIXED_ACTIVATIONS = 0.6


def first_optimizer(module: Any) -> torch.optim.Optimizer:
    """The optimiser ``configure_optimizers`` returns (alone, in a list, or in Lightning's dict)."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, list | tuple):
        configured = configured[0]
    return configured


def input_channels(module: Any) -> int:
    """The network's input channels, from its resolved config."""
    return int(module.hparams.net.get("in_channels", 1))


def training_batch(
    module: Any, batch: int, size: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """A random batch shaped as the loader serves it: images (float) and label maps (uint8) with every class."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, input_channels(module), *size, generator=generator)
    classes = int(module.num_classes)
    label = torch.randint(0, classes, (batch, 1, *size), generator=generator, dtype=torch.uint8)
    return {"image": image.to(device), "label": label.to(device)}


def validation_batch(
    module: Any, shape: Sequence[int], spacing: Sequence[float], device: torch.device
) -> dict:
    """One whole volume with its affine (the metrics read the spacing from it) and a box-shaped label."""
    generator = torch.Generator().manual_seed(1)
    affine = torch.diag(torch.tensor([*map(float, spacing), 1.0], dtype=torch.float64))
    image = MetaTensor(torch.randn(1, input_channels(module), *shape, generator=generator), affine=affine)
    label = torch.zeros(1, 1, *shape, dtype=torch.uint8)
    box = tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)
    label[(0, 0, *box)] = 1
    return {"image": image.to(device), "label": label.to(device)}


def as_precision(batch: dict[str, Any], precision: Precision) -> dict[str, Any]:
    """The batch with its images in the parameters' dtype, as Lightning's ``16-true``/``bf16-true``/``64`` give them."""
    if precision.autocast is not None or batch["image"].dtype == precision.parameters:
        return batch
    return {**batch, "image": batch["image"].to(precision.parameters)}


@contextlib.contextmanager
def quiet_steps() -> Iterator[None]:
    """Steps outside a Trainer, without Lightning's notice that their ``self.log`` calls go nowhere."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_TRAINER)
        yield


def train_steps(
    module: Any,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    precision: Precision,
    steps: int,
    scaler: Any = None,
) -> None:
    """``steps`` optimiser steps as Lightning takes them (zero_grad, training_step, backward, step).

    Gradients stay allocated after the last step, as they are when Lightning validates after an epoch.
    """
    device = batch["image"].device
    batch = as_precision(batch, precision)
    module.train()
    with quiet_steps():
        for index in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with precision.context(device):
                loss = module.training_step(batch, index)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()


def validate(module: Any, batch: dict[str, Any], precision: Precision) -> None:
    """One ``validation_step`` on a whole volume, waiting for its metrics (HD95 runs on a CPU thread)."""
    device = batch["label"].device
    batch = as_precision(batch, precision)
    module.eval()
    with quiet_steps(), torch.no_grad(), precision.context(device):
        module.validation_step(batch, 0)
    if module.surface is not None:
        module.surface.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """The median of a few timings."""
    return float(np.median(list(values)))
