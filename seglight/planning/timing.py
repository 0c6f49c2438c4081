"""Seconds per training step and per validation, measured with real steps of the module on the device that will
train, for turning ``plan.time_budget`` into epochs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seglight.core.io import atomic_path
from seglight.planning.memory import MEASURE_STEPS, ModuleFactory, release
from seglight.planning.steps import (
    Precision,
    first_optimizer,
    median,
    synchronize,
    train_steps,
    training_batch,
    validate,
    validation_batch,
)


@dataclass(frozen=True)
class Timing:
    """Measured seconds on one device."""

    device: str  # what ran it, for the printout
    step_s: float  # one training step of the planned batch
    validation_s: float  # one validation case (a volume of the median shape)
    checkpoint_s: float  # writing one checkpoint (weights and optimiser state), flushed to disk
    steps: int = (
        0  # training steps timed after the warm-up; 0: the warm-up's own time (slower, so on the safe side)
    )


def measure_timing(
    factory: ModuleFactory,
    mode: str,
    size: Sequence[int],
    batch: int,
    volume: Sequence[int],
    spacing: Sequence[float],
    device: torch.device,
    precision: Precision,
    scratch: Path,
    steps: int = MEASURE_STEPS,
    max_seconds: float | None = None,
) -> Timing:
    """Time ``steps`` training steps of ``batch`` inputs of ``size`` and one validation of ``volume``, each after
    an untimed one (allocations, cuDNN's algorithm search, lazy initialisation), and one checkpoint written into
    the folder ``scratch`` (and removed).

    ``max_seconds``: about the most the steps (and the validations) may take; fewer steps are timed when they
    are slow, and none when the warm-up alone takes that long (its time then stands for a step: an upper bound).
    """
    module = factory(mode, list(size), list(spacing)).to(device=device, dtype=precision.parameters)
    optimizer = first_optimizer(module)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler and device.type == "cuda" else None
    data = training_batch(module, batch, size, device)
    warm_up = _timed(device, lambda: train_steps(module, optimizer, data, precision, 1, scaler))
    timed = (
        max(1, steps) if max_seconds is None else min(max(1, steps), int(max_seconds // max(warm_up, 1e-9)))
    )
    durations = [
        _timed(device, lambda: train_steps(module, optimizer, data, precision, 1, scaler))
        for _ in range(timed)
    ]
    case = validation_batch(module, volume, spacing, device)
    validation_s = _timed(device, lambda: validate(module, case, precision))  # warm-up
    if max_seconds is None or 2 * validation_s <= max_seconds:
        validation_s = _timed(device, lambda: validate(module, case, precision))
    checkpoint_s = checkpoint_seconds(module, optimizer, scratch)
    release(module, optimizer)
    return Timing(
        describe_device(device),
        median(durations) if durations else warm_up,
        validation_s,
        checkpoint_s,
        len(durations),
    )


def _timed(device: torch.device, work: Any) -> float:
    """Seconds ``work()`` takes on ``device``, its queued GPU work included."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def checkpoint_seconds(module: Any, optimizer: torch.optim.Optimizer, folder: Path) -> float:
    """Seconds to write one checkpoint as training does (``atomic_path``: a temporary file, flushed, renamed)."""
    path = Path(folder) / ".plan-timing.ckpt"
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        torch.save({"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}, tmp)
    elapsed = time.perf_counter() - started
    path.unlink(missing_ok=True)
    return elapsed


def describe_device(device: torch.device) -> str:
    """``the CPU (2 threads)`` or ``NVIDIA H100 80GB HBM3``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"the CPU ({torch.get_num_threads()} threads)"
