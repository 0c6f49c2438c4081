"""Plan training for a dataset: ``python -m seglight.plan data=<option> [data.root=...] [plan.time_budget=8m]``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import seglight
from seglight.config.builder import build_module, fall_back_to_cpu
from seglight.core import console
from seglight.core.errors import reported_errors
from seglight.planning.files import write_plan_files
from seglight.planning.fingerprint import fingerprint_dataset
from seglight.planning.planner import ConfiguredFactory, Plan, make_plan
from seglight.planning.report import format_fingerprint, format_plan
from seglight.planning.settings import DataSettings, PlanSettings, plan_target

log = logging.getLogger("seglight")


def plan(cfg: DictConfig) -> Plan:
    """Fingerprint ``cfg.data``, plan training for ``cfg``'s model on it, print both, and write the files."""
    settings = PlanSettings.from_config(cfg.get("plan"))
    torch.manual_seed(int(cfg.get("seed", 0)))
    datamodule = instantiate(cfg.data, _convert_="all")
    fingerprint = fingerprint_dataset(datamodule)
    print(format_fingerprint(fingerprint), flush=True)
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
    )
    print(format_plan(result), flush=True)
    output_dir = cfg.get("paths", {}).get("output_dir")
    if output_dir:
        made = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seglight": seglight.__version__,
            "dataset": fingerprint.source.get("root"),
            "fingerprint": "fingerprint.json",
            "memory": f"{result.memory['method']}: {result.memory['budget']}",
        }
        paths = write_plan_files(output_dir, result, fingerprint, made)
        print(f"Wrote {', '.join(p.name for p in paths.values())} in {output_dir}")
    return result


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


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    console.setup()
    with reported_errors("seglight.plan"):
        plan(cfg)


if __name__ == "__main__":
    main()
