"""Optimisers and learning-rate schedules from configs, and a schedule that follows a run extended on resume."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from torch import nn

from seglight.core.errors import ConfigError
from seglight.core.internals import closed_form_lr, set_last_lr
from seglight.models.networks import AUTO

log = logging.getLogger("seglight")

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4, "weight_decay": 0.0}
# Scheduler arguments that take the schedule's length; "auto" fills in the run's epochs or optimiser steps.
LENGTH_KEYS = ("T_max", "total_iters", "t_total")


def build_optimizer(
    config: Mapping[str, Any], parameters: Iterator[nn.Parameter], gradient_clipping: bool = False
) -> torch.optim.Optimizer:
    """The optimiser of a partial config, fused (one kernel per step, no host sync) where that is safe.

    On CUDA, an optimiser that takes ``fused`` (Adam, AdamW, SGD) is built with ``fused=True`` unless the config
    says otherwise: besides being faster, a fused optimiser takes the AMP scaler's inf check on the device, where
    the unfused path reads it back to the host at every step under ``16-mixed``. Not with gradient clipping,
    which needs the gradients unscaled before the step. Elsewhere the config is used as it is.
    """
    params = list(parameters)
    partial = instantiate(config)
    options: dict[str, Any] = {}
    if (
        not gradient_clipping
        and "fused" not in config
        and "foreach" not in config
        and params
        and all(p.is_cuda and p.is_floating_point() for p in params)
        and _accepts(config.get("_target_"), "fused")
    ):
        options["fused"] = True
    try:
        return partial(params=params, **options)
    except (RuntimeError, ValueError, TypeError):
        if not options:
            raise
        return partial(params=params)  # a combination the fused kernel does not support: the plain one


def _accepts(target: Any, argument: str) -> bool:
    try:
        return argument in inspect.signature(get_class(str(target))).parameters
    except Exception:  # not a class we can inspect: leave it alone
        return False


def schedule_config(scheduler: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A scheduler config in Lightning's shape (``scheduler``, ``interval``, ...), or None for a constant rate."""
    if not scheduler:
        return None
    cfg = dict(scheduler)
    if "scheduler" not in cfg:
        raise ConfigError(
            f"scheduler: expected a 'scheduler' entry with a _target_ (see conf/scheduler/), got keys {sorted(cfg)}"
        )
    return cfg


def scheduler_settings(
    schedule: Mapping[str, Any], length: int | Callable[[], int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the scheduler's config with its ``auto`` lengths and warm-up filled in, Lightning's lr_scheduler options).

    ``length`` is how many times the scheduler will step (or a function that says, asked only when needed).
    """
    schedule = schedule_config(schedule) or {}
    target = dict(schedule["scheduler"])
    options = {k: v for k, v in schedule.items() if k in ("interval", "frequency")}
    options.setdefault("interval", "epoch")
    warmup_fraction = schedule.get("warmup_fraction")
    if warmup_fraction is not None or AUTO in (target.get(k) for k in LENGTH_KEYS):
        steps = length() if callable(length) else int(length)
        for key in LENGTH_KEYS:
            if target.get(key) == AUTO:
                target[key] = steps
        if warmup_fraction is not None:
            target["warmup_steps"] = round(float(warmup_fraction) * steps)
    return target, options


def build_schedule(
    schedule: Mapping[str, Any], optimizer: torch.optim.Optimizer, trainer: L.Trainer | None
) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry for a scheduler config: the scheduler on ``optimizer``, and how it steps."""
    interval = schedule.get("interval", "epoch")
    target, options = scheduler_settings(schedule, lambda: schedule_length(trainer, interval))
    return {"scheduler": instantiate(target)(optimizer=optimizer), **options}


def gradient_clipping(trainer: L.Trainer | None) -> bool:
    """Whether the trainer clips gradients (which rules out the fused optimisers)."""
    return bool(trainer is not None and trainer.gradient_clip_val)


def schedule_length(trainer: L.Trainer | None, interval: str) -> int:
    """How many times the scheduler will step: the run's optimiser steps or epochs."""
    if trainer is None:
        raise ConfigError("scheduler: an 'auto' length needs the Trainer (attach the module before asking)")
    if interval == "step":
        steps = trainer.estimated_stepping_batches
        if steps in (None, float("inf")):
            raise ConfigError("scheduler: 'auto' length needs trainer.max_epochs or trainer.max_steps")
        return int(steps)
    if trainer.max_epochs in (None, -1):
        raise ConfigError("scheduler: 'auto' length needs trainer.max_epochs")
    return int(trainer.max_epochs)


def follow_schedule_length(trainer: L.Trainer, schedule: Mapping[str, Any] | None) -> None:
    """Stretch an ``auto``-length schedule to this run's length when a checkpoint brought back another one.

    A checkpoint restores the scheduler with the length of the run that saved it; a run extended with a
    larger ``trainer.max_epochs`` would otherwise keep decaying towards the old end (and stay at the floor).
    The schedule then follows the new length from the current epoch or step, as if it had been planned
    for it from the start.
    """
    config = schedule_config(schedule) or {}
    target = dict(config.get("scheduler") or {})
    auto = [key for key in LENGTH_KEYS if target.get(key) == AUTO]
    if not auto or not trainer.lr_scheduler_configs:
        return
    scheduler_config = trainer.lr_scheduler_configs[0]
    scheduler = scheduler_config.scheduler
    length = schedule_length(trainer, scheduler_config.interval)
    before = {key: getattr(scheduler, key) for key in auto if hasattr(scheduler, key)}
    if not before or all(value == length for value in before.values()):
        return
    for key in before:
        setattr(scheduler, key, length)
    if config.get("warmup_fraction") is not None and hasattr(scheduler, "warmup_steps"):
        scheduler.warmup_steps = round(float(config["warmup_fraction"]) * length)
    rates = closed_form_rates(scheduler)
    if rates is None:
        log.warning(
            "%s: the schedule's length is now %d, but its current learning rate cannot be recomputed",
            type(scheduler).__name__,
            length,
        )
        return
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    set_last_lr(scheduler, rates)
    log.info(
        "Learning-rate schedule: %d %ss long (was %d in the checkpoint); learning rate now %.3g",
        length,
        scheduler_config.interval,
        next(iter(before.values())),
        rates[0],
    )


def closed_form_rates(scheduler: Any) -> list[float] | None:
    """The learning rates ``scheduler`` gives at its current epoch or step, from its formula; None if unknown."""
    rates = closed_form_lr(scheduler)  # CosineAnnealingLR, PolynomialLR, StepLR, ...
    if rates is not None:
        return rates
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # MONAI's WarmupCosineSchedule
        step = scheduler.last_epoch
        return [
            float(base * rate(step))
            for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
    return None
