"""From a fingerprint to a plan: the rules in order, the memory search, the timing, the warnings.

``make_plan`` is what ``python -m seglight.plan`` runs after reading the data (and what ``plan=auto`` in
training will run): everything it needs from the config comes in as ``PlanSettings`` (``plan.*``),
``DataSettings`` (``data.*``), the model config, a ``Target`` (``plan_target``) and a ``ConfiguredFactory`` that
builds the configured module (``seglight.config.plans.module_factory``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.data.splits import holdout_split
from seglight.models.networks import class_name, output_channels
from seglight.planning import preprocessing, rules, schedule
from seglight.planning.fingerprint import Fingerprint
from seglight.planning.memory import Budget, Estimator, Meter, gib
from seglight.planning.risks import plan_risks
from seglight.planning.settings import DataSettings, PlanSettings, Target
from seglight.planning.timing import measure_timing

# (mode, input size, target spacing, model settings to change) -> the module training would build for them, on
# the CPU; seglight.config.plans.module_factory builds it through seglight.config.builder.build_module.
ConfiguredFactory = Callable[[str, Sequence[int], Sequence[float], Mapping[str, Any]], Any]


@dataclass
class Plan:
    """A plan: decisions in order, warnings, and the memory and time measurements behind them."""

    decisions: list[rules.Decision]
    risks: list[str]
    memory: dict[str, Any]
    timing: dict[str, Any] | None
    settings: dict[str, Any]
    seconds: float = 0.0

    def overrides(self) -> dict[str, Any]:
        """Every decision's config overrides (dotted keys), in decision order."""
        merged: dict[str, Any] = {}
        for decision in self.decisions:
            merged.update(decision.overrides)
        return merged

    def decision(self, name: str) -> rules.Decision:
        """The decision named ``name``."""
        return next(d for d in self.decisions if d.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``plan.json``)."""
        return {
            "settings": self.settings,
            "decisions": [asdict(d) for d in self.decisions],
            "overrides": self.overrides(),
            "warnings": self.risks,
            "memory": self.memory,
            "timing": self.timing,
            "planning_seconds": round(self.seconds, 2),
        }


class MemorySearch:
    """The memory tests of one plan: a measurement on this GPU or an estimate, per mode, each result recorded.

    Args:
        target: what the plan is for; budget: the memory the candidates may use.
        factory: builds the module for a (mode, size, spacing); volume: the largest volume validation segments.
        spacing: the target spacing; steps: training steps per GPU measurement.
    """

    def __init__(
        self,
        target: Target,
        budget: Budget,
        factory: Callable[[str, Sequence[int], Sequence[float]], Any],
        volume: Sequence[int],
        spacing: Sequence[float],
        steps: int,
    ) -> None:
        self.target, self.budget = target, budget
        self.factory, self.volume, self.spacing, self.steps = factory, list(volume), list(spacing), steps
        self.tested: dict[tuple[str, tuple[int, ...], int], Any] = {}  # (mode, size, batch) -> Use
        self._profiles: dict[str, Any] = {}  # the estimate's per-network measurements, shared by both modes
        self._meters: dict[str, Any] = {}

    def use(self, mode: str, size: Sequence[int], batch: int) -> Any:
        """What ``batch`` inputs of ``size`` need in ``mode`` (recorded)."""
        key = (mode, tuple(int(s) for s in size), int(batch))
        if key not in self.tested:
            self.tested[key] = self._meter(mode)(size, batch)
        return self.tested[key]

    def fits(self, mode: str) -> Callable[[Sequence[int], int], bool]:
        """The memory test of ``mode``'s candidates against the budget."""
        return lambda size, batch: self.use(mode, size, batch).peak_bytes <= self.budget.usable_bytes

    def record(self) -> list[dict[str, Any]]:
        """Every test, for plan.json."""
        return [
            {"mode": m, "size": list(size), "batch": b, **asdict(u)}
            for (m, size, b), u in self.tested.items()
        ]

    def _meter(self, mode: str) -> Any:
        if mode not in self._meters:
            target = self.target
            if target.measured:
                self._meters[mode] = Meter(
                    self.factory, mode, target.precision, self.volume, self.spacing, target.cache_file,
                    steps=self.steps,
                )  # fmt: skip
            else:
                self._meters[mode] = Estimator(
                    self.factory, mode, target.precision, self.volume, self.spacing, profiles=self._profiles
                )
        return self._meters[mode]


@dataclass
class Stage:
    """The decisions that depend on the target spacing, made at one spacing."""

    spacing: list[float]
    median: np.ndarray
    budget: Budget
    search: MemorySearch
    fit: rules.Fit
    decisions: list[rules.Decision]  # mode, size, batch, network, (patch sampling)
    timing: Any
    epochs: rules.Decision

    @property
    def max_epochs(self) -> int:
        """The epochs this stage's schedule gives."""
        value = self.epochs.value
        return int(value["max_epochs"] if isinstance(value, dict) else value)


def make_plan(
    fingerprint: Fingerprint,
    settings: PlanSettings,
    data: DataSettings,
    model: Mapping[str, Any],
    factory: ConfiguredFactory,
    target: Target,
    configured_epochs: int,
    budget_start: float | None = None,
) -> Plan:
    """Apply the rules to a fingerprint, fitting size and batch to ``target``'s memory and epochs to the time.

    Every candidate is built by ``factory`` as training would build it (with the model settings the plan would
    write for it, e.g. DynUNet's filters per stage), for the memory tests and the timing alike. When
    ``plan.time_budget`` allows too few epochs at the data's spacing, the plan is made again at a coarser one.
    ``budget_start``: a ``time.monotonic()`` reading from which the time budget counts (``plan=auto``: the run's
    start, so reading the data and planning come out of it); None: the budget is the training's alone.
    """
    started = time.perf_counter()
    model = plain(dict(model))
    modalities, modality = rules.decide_modalities(fingerprint, settings.modality)
    spacing, spacing_decision = rules.decide_spacing(fingerprint, settings.target_spacing)
    plan_at = functools.partial(
        _plan_at,
        fingerprint=fingerprint,
        settings=settings,
        data=data,
        model=model,
        factory=factory,
        target=target,
        configured_epochs=configured_epochs,
        budget_start=budget_start,
    )
    stage = plan_at(spacing)
    factor = schedule.coarsening(stage.max_epochs) if settings.time_budget else 1.0
    if factor > 1.0 and settings.target_spacing is None:
        first = stage
        coarse = [round(s * factor, 3) for s in spacing]
        stage = plan_at(coarse)
        spacing_decision = schedule.decide_coarsening(
            spacing_decision, coarse, factor, first.max_epochs, stage.max_epochs
        )
    mode = stage.decisions[0].value
    decisions = [modality, spacing_decision, *stage.decisions]
    decisions += [preprocessing.decide_normalization(fingerprint, modalities), stage.epochs]
    risks = plan_risks(
        fingerprint,
        spacing=stage.spacing,
        mode=mode,
        size=stage.fit.size,
        batch=stage.fit.batch,
        median_shape=stage.median,
        modalities=modalities,
        network=class_name(model),
        classes=max(2, output_channels(fingerprint.label_names)) if fingerprint.label_names else 2,
        usable_bytes=stage.budget.usable_bytes,
        fits=stage.fit.fits,
        epochs=stage.max_epochs if settings.time_budget else None,
    )
    if factor > 1.0 and settings.target_spacing is not None:
        risks.append(
            f"plan.time_budget allows {stage.max_epochs} epoch(s) at the kept plan.target_spacing; without it the "
            f"plan would coarsen the spacing {factor:.3g}x for more epochs"
        )
    if target.gpu and not target.measured:
        risks.append(
            "memory is planned for a GPU this machine does not have, but steps were timed on the CPU: plan again "
            "on the GPU for the time budget (and for measured memory)"
        )
    memory = {
        "method": "measured" if target.measured else "estimated",
        "budget": stage.budget.describe(),
        "usable_bytes": stage.budget.usable_bytes,
        "precision": target.precision.name,
        "chosen": asdict(stage.search.use(mode, stage.fit.size, stage.fit.batch)),
        "tests": stage.search.record(),
    }
    return Plan(
        decisions, risks, memory, asdict(stage.timing), asdict(settings), time.perf_counter() - started
    )


def _plan_at(
    spacing: Sequence[float],
    fingerprint: Fingerprint,
    settings: PlanSettings,
    data: DataSettings,
    model: dict[str, Any],
    factory: ConfiguredFactory,
    target: Target,
    configured_epochs: int,
    budget_start: float | None = None,
) -> Stage:
    """Mode, size, batch, network and sampling at ``spacing``, then the timing and the epochs."""

    def candidate(mode: str, size: Sequence[int], spacing: Sequence[float]) -> Any:
        return factory(mode, size, spacing, rules.network_overrides(model, size, spacing))

    spacing = [float(s) for s in spacing]
    shapes = rules.shapes_at(fingerprint, spacing)
    largest = [int(v) for v in shapes[int(np.argmax(shapes.prod(axis=1)))]]
    budget = _with_gpu_cache(target, data, fingerprint, shapes)
    search = MemorySearch(target, budget, candidate, largest, spacing, settings.measure_steps)
    mode_decision, fit, size_decision, batch_decision = _geometry(
        fingerprint, settings, data, model, spacing, shapes, search
    )
    mode, median = mode_decision.value, np.median(shapes, axis=0)
    option = "data.patch.size" if mode == "patch" else "data.spatial_size"
    network_spacing = _network_spacing(mode, spacing, median, fit.size)
    decisions = [mode_decision, size_decision, batch_decision]
    decisions.append(rules.decide_network(model, fit.size, network_spacing, option))
    if mode == "patch":
        decisions.append(preprocessing.decide_sampling(fingerprint, data.pos_neg_ratio))
    volume = [int(round(v)) for v in median] if mode == "patch" else fit.size
    budget_s = schedule.parse_duration(settings.time_budget) if settings.time_budget else None
    timing = measure_timing(
        candidate, mode, fit.size, fit.batch, volume, spacing, target.timing_device, target.timing_precision,
        target.cache_file.parent, steps=settings.measure_steps,
        max_seconds=schedule.TIMING_SHARE * budget_s if budget_s else None,
    )  # fmt: skip
    batch_size = batch_decision.overrides["data.batch_size"]
    spent = time.monotonic() - budget_start if budget_start is not None else 0.0
    epochs = _schedule(fingerprint, settings, data, timing, batch_size, configured_epochs, spent)
    return Stage(spacing, median, budget, search, fit, decisions, timing, epochs)


def _geometry(
    fingerprint: Fingerprint,
    settings: PlanSettings,
    data: DataSettings,
    model: Mapping[str, Any],
    spacing: Sequence[float],
    shapes: np.ndarray,
    search: MemorySearch,
) -> tuple[rules.Decision, rules.Fit, rules.Decision, rules.Decision]:
    """Mode, then the largest size and batch that fit: (mode, fit, size and batch decisions)."""
    median, smallest = np.median(shapes, axis=0), shapes.min(axis=0)
    sizes = rules.NetworkSizes(model, tuple(spacing))
    whole = sizes.round_nearest(median)
    alike = max(rules.spread(shapes)) <= rules.SPREAD and max(spacing) / min(spacing) <= rules.ANISOTROPY
    whole_fits = None  # tested only when nothing else rules resize mode out
    if alike and math.prod(median) <= rules.START_VOLUME and settings.target_spacing is None:
        whole_fits = search.fits("resize")(whole, rules.MIN_BATCH)
    mode_decision = rules.decide_mode(shapes, spacing, whole, whole_fits, settings.target_spacing is not None)
    mode = mode_decision.value
    if mode == "patch":
        start, start_numbers = rules.initial_size(spacing, median, smallest)
        candidates = rules.candidate_sizes(start, median, sizes)
        if not candidates:
            raise ConfigError(
                f"the smallest volume ({rules.axes(smallest)} voxels at {rules.axes(spacing)} mm) is smaller than "
                f"{class_name(model)} accepts ({sizes.rule(smallest)}): use model=dynunet, or a finer "
                "plan.target_spacing"
            )
    else:
        start_numbers = f"median shape {rules.axes(np.round(median, 1))} at the target spacing"
        candidates = [whole, *rules.candidate_sizes(whole, median, sizes)[1:]]
    fit = rules.fit_size_and_batch(
        candidates, search.fits(mode), float(np.prod(median)) * fingerprint.num_cases
    )
    use = _use_text(search.use(mode, fit.size, fit.batch), search.budget, search.target)
    size_decision = rules.decide_size(mode, fit, spacing, start_numbers, sizes.rule(fit.size), use)
    return mode_decision, fit, size_decision, rules.decide_batch(mode, fit, data.num_samples)


def _schedule(
    fingerprint: Fingerprint,
    settings: PlanSettings,
    data: DataSettings,
    timing: Any,
    batch_size: int,
    configured_epochs: int,
    spent_s: float = 0.0,
) -> rules.Decision:
    """Epochs (and the validation interval) from the measured times, for ``plan.time_budget`` if given, less
    ``spent_s`` already gone."""
    train_cases, val_cases = _split_sizes(fingerprint, data)
    budget_s = schedule.parse_duration(settings.time_budget) if settings.time_budget else None
    return schedule.decide_schedule(
        budget_s, timing.step_s, timing.validation_s, train_cases, val_cases, batch_size, configured_epochs,
        schedule.overhead_seconds(fingerprint.seconds, timing.validation_s), timing.device, timing.checkpoint_s,
        spent_s,
    )  # fmt: skip


def _with_gpu_cache(
    target: Target, data: DataSettings, fingerprint: Fingerprint, shapes: np.ndarray
) -> Budget:
    """The budget less the training cases cached on the GPU (``data.cache=gpu``, or ``auto`` when they fit in
    ``data.gpu_cache_share`` of it): float32 images and uint8 labels at the target spacing."""
    budget = target.budget
    if not target.gpu or data.cache not in ("auto", "gpu"):
        return budget
    channels = max(c.channels for c in fingerprint.cases)
    cached = float(shapes.prod(axis=1).sum()) * (4 * channels + 1) * (1.0 - data.val_fraction)
    if data.cache == "auto" and cached > data.gpu_cache_share * budget.total_bytes:
        return budget  # auto keeps them in host memory then
    why = f"training cache on the GPU (data.cache={data.cache})"
    return Budget(budget.total_bytes, budget.source, budget.margin, cached, why)


def _use_text(use: Any, budget: Budget, target: Target) -> str:
    how = "measured" if target.measured else "estimated"
    return (
        f"{how} peak {gib(use.peak_bytes)} (training {gib(use.train_bytes)}, validation "
        f"{gib(use.validation_bytes)}) at {target.precision.name} against {budget.describe()}"
    )


def _network_spacing(
    mode: str, spacing: Sequence[float], median: np.ndarray, size: Sequence[int]
) -> list[float]:
    """The voxel spacing the network sees: the target spacing, or resize mode's spacing after resizing."""
    if mode == "patch":
        return [float(s) for s in spacing]
    return [float(s) * float(m) / float(n) for s, m, n in zip(spacing, median, size, strict=True)]


def _split_sizes(fingerprint: Fingerprint, data: DataSettings) -> tuple[int, int]:
    """(training, validation) cases as the data module will split them."""
    ids = [c.case_id or str(i) for i, c in enumerate(fingerprint.cases)]
    if len(ids) < 2:
        return len(ids), 0
    if data.num_folds is not None:
        val = math.ceil(len(ids) / data.num_folds)
        return len(ids) - val, val
    train, val = holdout_split(ids, data.val_fraction, 0)
    return len(train), len(val)
