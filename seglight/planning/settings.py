"""What a plan is for: the planner's options (``plan.*``), what it reads of the data config (``data.*``), and the
target (memory budget, how memory is tested, precision, where steps are timed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.planning import schedule
from seglight.planning.memory import (
    CPU_MEMORY_SHARE,
    DEFAULT_MARGIN,
    GIB,
    MEASURE_STEPS,
    Budget,
    free_ram_bytes,
)
from seglight.planning.steps import Precision

PLAN_OPTIONS = ("gpu_memory_gb", "time_budget", "target_spacing", "modality", "margin", "measure_steps")
# A saved plan's record of what it was made from (plan.made), beside the options; not an option itself.
MADE = "made"
# What training records beside the options (not options either): plan=auto (auto), the plan file (source), the
# keys given on the command line (given, recorded by seglight.compose), the plan's overrides that were applied and
# those the command line overrode (applied, skipped).
RECORD_KEYS = (MADE, "auto", "source", "given", "applied", "skipped")


@dataclass(frozen=True)
class PlanSettings:
    """The planner's options (``plan.*`` in conf/plan/default.yaml)."""

    gpu_memory_gb: float | None = None  # GiB to plan for; None: this GPU's free memory (or the CPU's RAM)
    time_budget: str | None = None  # e.g. 8m, 2h: epochs to fill it; None: trainer.max_epochs as configured
    target_spacing: list[float] | None = None  # mm (x, y, z): the deployment spacing, kept
    modality: list[str] | None = None  # per channel, kept (else dataset.json's, else guessed)
    margin: float = DEFAULT_MARGIN  # share of the memory kept free
    measure_steps: int = MEASURE_STEPS  # real training steps per measurement (memory on a GPU; time)

    @classmethod
    def from_config(cls, options: Mapping[str, Any] | None) -> PlanSettings:
        """Checked settings from the ``plan`` config node; a wrong value is a ConfigError naming it."""
        given = plain(options) or {}
        unknown = sorted(set(given) - set(PLAN_OPTIONS) - set(RECORD_KEYS))
        if unknown:
            raise ConfigError(f"plan.{unknown[0]}: not a plan option (they are {', '.join(PLAN_OPTIONS)})")
        memory = given.get("gpu_memory_gb")
        if memory is not None and float(memory) <= 0:
            raise ConfigError(f"plan.gpu_memory_gb must be a positive number of GiB, got {memory}")
        margin = float(given.get("margin", DEFAULT_MARGIN))
        if not 0.0 <= margin < 0.9:
            raise ConfigError(
                f"plan.margin must be at least 0 and below 0.9 (a share of the memory), got {margin}"
            )
        if given.get("time_budget") is not None:
            schedule.parse_duration(given["time_budget"])  # checked now, before any data is read
        modality = given.get("modality")
        if isinstance(modality, str):
            modality = [modality]
        spacing = given.get("target_spacing")
        return cls(
            gpu_memory_gb=None if memory is None else float(memory),
            time_budget=None if given.get("time_budget") is None else str(given["time_budget"]),
            target_spacing=None if spacing is None else [float(s) for s in spacing],
            modality=None if modality is None else [str(m) for m in modality],
            margin=margin,
            measure_steps=max(1, int(given.get("measure_steps", MEASURE_STEPS))),
        )


@dataclass(frozen=True)
class DataSettings:
    """What the plan takes from the data config (``data.*``)."""

    num_samples: int = 4  # data.patch.num_samples: patches per case per step
    pos_neg_ratio: tuple[float, ...] = (1.0, 1.0)
    val_fraction: float = 0.2
    num_folds: int | None = None  # set when data.fold is: one fold validates
    cache: str = "auto"
    gpu_cache_share: float = 0.25

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> DataSettings:
        """From the ``data`` config node."""
        data = plain(data) or {}
        patch = data.get("patch") or {}
        return cls(
            num_samples=int(patch.get("num_samples", 4)),
            pos_neg_ratio=tuple(float(v) for v in patch.get("pos_neg_ratio") or (1.0, 1.0)),
            val_fraction=float(data.get("val_fraction", 0.2)),
            num_folds=int(data.get("num_folds", 5)) if data.get("fold") is not None else None,
            cache=str(data.get("cache", "auto")),
            gpu_cache_share=float(data.get("gpu_cache_share", 0.25)),
        )


@dataclass(frozen=True)
class Target:
    """Where the plan is for: the memory budget and how it is tested, the precision, where steps are timed."""

    budget: Budget
    gpu: bool  # the plan is for a GPU (this one, or one of plan.gpu_memory_gb)
    measured: bool  # True: memory measured on this CUDA GPU; False: estimated
    precision: Precision  # the training precision on the planned device
    timing_device: torch.device
    timing_precision: Precision
    cache_file: Path  # where GPU measurements are kept


def plan_target(settings: PlanSettings, trains_on_cuda: bool, precision: str, cache_dir: Path) -> Target:
    """CUDA here and the trainer on it: measure, against ``plan.gpu_memory_gb`` or the free memory. Otherwise
    estimate: for ``plan.gpu_memory_gb`` of a GPU (at the trainer's precision), else for training on this CPU
    (``CPU_MEMORY_SHARE`` of the free RAM, 32-bit). Steps are timed where training would run here."""
    cache_file = Path(cache_dir).expanduser() / "planning" / "gpu_memory.json"
    configured = Precision.of(precision)
    cpu, full = torch.device("cpu"), Precision.of("32")
    given = settings.gpu_memory_gb
    if trains_on_cuda and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        total = given * GIB if given is not None else float(free)
        source = f"plan.gpu_memory_gb={given:g}" if given is not None else f"free memory of {name}"
        return Target(
            Budget(total, source, settings.margin), True, True, configured, device, configured, cache_file
        )
    if given is not None:
        budget = Budget(given * GIB, f"plan.gpu_memory_gb={given:g}, no CUDA here", settings.margin)
        return Target(budget, True, False, configured, cpu, full, cache_file)
    ram = free_ram_bytes() * CPU_MEMORY_SHARE
    budget = Budget(ram, f"training on the CPU: {CPU_MEMORY_SHARE:.0%} of the free RAM", settings.margin)
    return Target(budget, False, False, full, cpu, full, cache_file)
