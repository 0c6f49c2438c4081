"""Training with a plan: ``plan=auto`` (read the data and plan, then train) and ``plan=<file>`` (a saved plan.yaml).

``plan_dataset`` is what ``python -m seglight.plan`` and ``plan=auto`` share: the fingerprint, the target and
``make_plan`` with the module training would build (``module_factory``). ``with_plan`` is what training runs
before it builds anything. ``plan=auto``: it plans (or reuses the run folder's plan.yaml, on a restart), writes
plan.yaml, plan.json and fingerprint.json into the run folder and applies the plan's overrides except those given
on the command line; with ``plan.time_budget`` the ``TimeBudget`` callback then keeps the run to it.
``plan=<file>`` (composed by ``builder.plan_file_arguments``): it copies the file and its siblings into the run
folder. Either way ``cfg.plan`` then records what was applied and what the command line overrode, and the module
saves that record in its checkpoints (``seglight.planning.files.plan_record``).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from seglight.config.builder import build_module, fall_back_to_cpu
from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.core.io import atomic_path
from seglight.core.versions import package_versions
from seglight.planning.files import (
    FINGERPRINT_FILE,
    PLAN_FILE,
    PLAN_RECORD,
    SOURCE,
    applied_overrides,
    read_plan,
    write_plan_files,
)
from seglight.planning.fingerprint import Fingerprint, fingerprint_dataset
from seglight.planning.planner import ConfiguredFactory, Plan, make_plan
from seglight.planning.report import format_fingerprint, format_plan
from seglight.planning.schedule import parse_duration
from seglight.planning.settings import MADE, DataSettings, PlanSettings, plan_target
from seglight.training.callbacks.time_budget import TimeBudget
from seglight.training.distributed import env_rank

log = logging.getLogger("seglight")

# How long the other processes of a run wait for rank 0's plan (torchrun starts them all at once).
WAIT_FOR_PLAN_S = 3600.0


def module_factory(cfg: DictConfig) -> ConfiguredFactory:
    """Builds the module ``python -m seglight.train`` would build for ``cfg`` at a candidate input size, spacing
    and model settings (``seglight.config.builder.build_module``), without its learning-rate schedule."""

    def factory(mode: str, size: Sequence[int], spacing: Sequence[float], model: Mapping[str, Any]) -> Any:
        data: dict[str, Any] = {"mode": mode}
        if mode == "patch":
            data["patch"] = {"size": list(size), "target_spacing": [float(s) for s in spacing]}
        else:
            data["spatial_size"] = list(size)
        candidate = OmegaConf.merge(cfg, {"data": data, "model": dict(model), "scheduler": None})
        return build_module(candidate)

    return factory


def plan_dataset(
    cfg: DictConfig, show: Callable[[str], None], budget_start: float | None = None
) -> tuple[Plan, Fingerprint]:
    """Fingerprint ``cfg.data`` and plan training for ``cfg``'s model on it, showing each as it is ready.

    ``budget_start``: the ``time.monotonic()`` reading from which ``plan.time_budget`` counts (None: the budget is
    the training's alone, as for ``python -m seglight.plan``).
    """
    settings = PlanSettings.from_config(cfg.get("plan"))
    torch.manual_seed(int(cfg.get("seed", 0)))
    datamodule = instantiate(cfg.data, _convert_="all")
    fingerprint = fingerprint_dataset(datamodule)
    show(format_fingerprint(fingerprint))
    trainer = fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
    target = plan_target(
        settings,
        trains_on_cuda=str(trainer.get("accelerator")).lower() != "cpu" and torch.cuda.is_available(),
        precision=str(cfg.trainer.get("precision", "32")),
        cache_dir=Path(cfg.paths.cache_dir),
    )
    result = make_plan(
        fingerprint,
        settings,
        DataSettings.from_config(cfg.data),
        OmegaConf.to_container(cfg.model, resolve=True),
        module_factory(cfg),
        target,
        configured_epochs=int(cfg.trainer.max_epochs),
        budget_start=budget_start,
    )
    show(format_plan(result))
    return result, fingerprint


def made_record(plan: Plan, fingerprint: Fingerprint) -> dict[str, Any]:
    """What a plan was made from (``plan.made`` in its files)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seglight": package_versions(("seglight",))["seglight"],
        "dataset": fingerprint.source.get("root"),
        "fingerprint": FINGERPRINT_FILE,
        "memory": f"{plan.memory['method']}: {plan.memory['budget']}",
    }


def with_plan(cfg: DictConfig, budget_start: float | None = None) -> DictConfig:
    """``cfg`` with its plan applied (``plan=auto``) or recorded (``plan=<file>``); unchanged without a plan.

    ``plan=auto`` plans on global rank 0 and writes the plan files into the run folder; a run folder that holds a
    plan.yaml already (a restart, or the other processes of a run) reuses it instead of planning again.
    """
    node = plain(cfg.get("plan")) or {}
    folder = Path(cfg.paths.output_dir)
    if node.get("auto"):
        saved = folder / PLAN_FILE
        if not saved.is_file() and env_rank() != 0:
            _wait_for(saved)
        if saved.is_file():
            log.info("Training with this run folder's plan (%s); delete it to plan again", saved)
            values = read_plan(saved)
            made = dict(values["plan"].get(MADE) or {})
        else:
            plan, fingerprint = plan_dataset(cfg, log.info, budget_start)
            made = made_record(plan, fingerprint)
            write_plan_files(folder, plan, fingerprint, made)
            values = read_plan(saved)
        cfg = _apply(cfg, applied_overrides(values), {MADE: made, SOURCE: "auto"})
        return keep_to_budget(cfg, budget_start)
    if node.get(SOURCE):
        source = Path(str(node[SOURCE]))
        if env_rank() == 0:
            _copy_plan_files(source, folder)
        # Hydra composed the file already; what remains is to record what the command line overrode.
        values = applied_overrides(
            read_plan(folder / PLAN_FILE if (folder / PLAN_FILE).is_file() else source)
        )
        return _apply(cfg, values, {})
    return cfg


def _apply(cfg: DictConfig, overrides: Mapping[str, Any], record: Mapping[str, Any]) -> DictConfig:
    """Set the plan's ``overrides`` in ``cfg`` except where the command line gave the key (or one above it), and
    record both in ``cfg.plan``."""
    given = given_keys(cfg)
    applied = {k: v for k, v in overrides.items() if not _covered(k, given)}
    skipped = sorted(k for k in overrides if k not in applied)
    with open_dict(cfg):
        for key, value in applied.items():
            OmegaConf.update(cfg, key, value, merge=False)
        cfg.plan.update({**record, "applied": applied, "skipped": skipped})
    if skipped:
        log.info("The command line overrides the plan's %s", ", ".join(skipped))
    return cfg


def keep_to_budget(cfg: DictConfig, budget_start: float | None) -> DictConfig:
    """With ``plan.time_budget`` (and no ``trainer.max_epochs`` on the command line), the ``TimeBudget`` callback
    moves the planned epochs to what the run's own epochs show will fit before the deadline."""
    budget = cfg.plan.get("time_budget")
    if budget is None or _covered("trainer.max_epochs", given_keys(cfg)):
        return cfg
    spent = time.monotonic() - budget_start if budget_start is not None else 0.0
    deadline = time.time() - spent + parse_duration(budget)
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        cfg.callbacks.time_budget = {"_target_": f"{TimeBudget.__module__}.TimeBudget", "deadline": deadline}
    return cfg


def given_keys(cfg: DictConfig) -> set[str]:
    """The config keys given on the command line (or to ``seglight.compose``): those Hydra ran with, and those
    ``compose`` recorded in ``plan.given``; group choices (``data=msd``) are not keys."""
    overrides = [str(o) for o in ((cfg.get("plan") or {}).get("given") or [])]
    if HydraConfig.initialized():
        overrides += list(HydraConfig.get().overrides.task)
    keys = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if "." not in key and isinstance(cfg.get(key), Mapping):
            continue  # a group choice: the plan was made for it
        keys.add(key)
    return keys


def _covered(key: str, given: Iterable[str]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in given)


def _copy_plan_files(source: Path, folder: Path) -> None:
    """The plan file, and the plan.json and fingerprint.json beside it, into the run folder."""
    if not source.is_file():
        raise ConfigError(f"plan file {source}: not found (plan.source)")
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in (
        (PLAN_FILE, source),
        *((n, source.parent / n) for n in (PLAN_RECORD, FINGERPRINT_FILE)),
    ):
        target = folder / name
        if path.is_file() and path.resolve() != target.resolve():
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)


def _wait_for(path: Path) -> None:
    """Wait until global rank 0 has written the run's plan (``WAIT_FOR_PLAN_S`` at most)."""
    deadline = time.monotonic() + WAIT_FOR_PLAN_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"plan=auto: rank 0 wrote no {path} in {WAIT_FOR_PLAN_S:.0f} s")
        time.sleep(2.0)
