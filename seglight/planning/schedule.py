"""The schedule for a time budget: ``plan.time_budget`` (``8m``, ``2h``) -> epochs and a validation interval,
from seconds measured per step and per validation (``seglight.planning.timing``)."""

from __future__ import annotations

import math
import re
from typing import Any

from seglight.core.errors import ConfigError
from seglight.planning.rules import Decision

# Start-up besides reading the data: imports, building the model and the trainer, writing the first checkpoint.
STARTUP_SECONDS = 15.0
VALIDATION_SHARE = 0.2  # at most this share of the training time goes to validation
SANITY_CASES = 2  # Lightning validates this many cases before training (num_sanity_val_steps)
# Per epoch besides the steps: Lightning's loops, starting the loader, logging (an estimate, not measured).
EPOCH_OVERHEAD_SECONDS = 0.1
CHECKPOINTS_PER_VALIDATION = 2  # last.ckpt, and the best checkpoint when Dice improved (conf/callbacks)
# A time budget that allows fewer epochs than this at the data's spacing coarsens it (experiment=demo trains 20),
# by at most this factor per axis.
MIN_EPOCHS = 20
MAX_COARSENING = 2.0
# With a time budget, timing the steps of one candidate takes about this share of it at most (fewer steps timed).
TIMING_SHARE = 0.03


def overhead_seconds(read_seconds: float, validation_s: float) -> float:
    """Time outside the epochs: start-up, caching the cases (about as long as the fingerprint took to read them,
    with the same threads) and Lightning's sanity check."""
    return STARTUP_SECONDS + read_seconds + SANITY_CASES * validation_s


def coarsening(epochs: int) -> float:
    """Per-axis factor for the target spacing when a time budget allows fewer than ``MIN_EPOCHS``: the voxels,
    and with them the time of a step and of a validation, shrink with its cube; at most ``MAX_COARSENING``."""
    if epochs >= MIN_EPOCHS:
        return 1.0
    return min(MAX_COARSENING, (MIN_EPOCHS / max(epochs, 1)) ** (1 / 3))


def decide_coarsening(
    decision: Decision, spacing: list[float], factor: float, before: int, after: int
) -> Decision:
    """The target spacing decision, coarsened for the time budget."""
    return Decision(
        decision.name,
        spacing,
        f"{decision.rule}; then, when plan.time_budget allows fewer than {MIN_EPOCHS} epochs, every axis "
        f"x (20 / epochs)^(1/3), at most {MAX_COARSENING:g}x",
        f"{decision.numbers}; at {decision.value} mm the budget allows {before} epoch(s): x {factor:.3g} -> "
        f"{spacing} mm ({factor**3:.3g}x fewer voxels), {after} epoch(s)",
        decision.overrides,
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms]?)")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: Any, option: str = "plan.time_budget") -> float:
    """Seconds in ``8m``, ``2h``, ``1h30m``, ``90s`` or a plain number of seconds; a ConfigError otherwise."""
    value = str(text).strip().lower().replace(" ", "")
    parts = list(_DURATION.finditer(value))
    if not value or not parts or "".join(p.group(0) for p in parts) != value:
        raise ConfigError(f"{option}={text!r} is not a duration: give e.g. 8m, 2h, 1h30m or 90s")
    seconds = sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
    if seconds <= 0:
        raise ConfigError(f"{option}={text!r}: the time budget must be positive")
    return seconds


def decide_schedule(
    budget_s: float | None,
    step_s: float,
    validation_s: float,
    train_cases: int,
    val_cases: int,
    batch_size: int,
    configured_epochs: int,
    overhead_s: float,
    device: str,
    checkpoint_s: float = 0.0,
    spent_s: float = 0.0,
) -> Decision:
    """Epochs and the validation interval for a time budget: validation (with its checkpoints) takes at most
    ``VALIDATION_SHARE`` of the time, and the last epoch validates (so the run ends with its best model).

    ``spent_s``: seconds of the budget already gone (``plan=auto`` plans inside the run it times)."""
    steps = max(1, math.ceil(train_cases / max(1, batch_size)))
    epoch_s = steps * step_s + EPOCH_OVERHEAD_SECONDS
    val_s = val_cases * validation_s + CHECKPOINTS_PER_VALIDATION * checkpoint_s
    measured = (
        f"on {device}: {step_s:.3g} s per training step x {steps} steps per epoch ({train_cases} training cases, "
        f"batch {batch_size}) + {EPOCH_OVERHEAD_SECONDS:g} s = {epoch_s:.3g} s an epoch; a validation {val_cases} "
        f"case(s) x {validation_s:.3g} s + {CHECKPOINTS_PER_VALIDATION} checkpoints x {checkpoint_s:.3g} s = "
        f"{val_s:.3g} s"
    )
    if budget_s is None:
        total = overhead_s + configured_epochs * (epoch_s + val_s)
        return Decision(
            "epochs",
            configured_epochs,
            "no plan.time_budget: trainer.max_epochs as configured",
            f"{measured}; {configured_epochs} epochs take about {total / 60:.1f} min",
        )
    share = VALIDATION_SHARE / (1.0 - VALIDATION_SHARE)
    interval = max(1, math.ceil(val_s / (share * epoch_s))) if epoch_s > 0 else 1
    usable = budget_s - spent_s - overhead_s
    epochs = int(usable // (epoch_s + val_s / interval)) if usable > 0 else 0
    if epochs < interval:
        interval = max(1, epochs)
    epochs = max(1, epochs // interval * interval)
    total = spent_s + overhead_s + epochs * epoch_s + (epochs // interval) * val_s
    spent = f" - {spent_s:.3g} s spent planning in the run" if spent_s else ""
    return Decision(
        "epochs",
        {"max_epochs": epochs, "check_val_every_n_epoch": interval},
        f"fill plan.time_budget; validation at most {VALIDATION_SHARE:.0%} of the time, and the last epoch validates",
        f"{measured}; budget {budget_s:g} s{spent} - {overhead_s:.3g} s start-up and caching -> {epochs} epochs, "
        f"validating every {interval} (about {total:.0f} s in all)",
        {"trainer.max_epochs": epochs, "trainer.check_val_every_n_epoch": interval},
    )
