"""Plan training for a dataset: ``python -m seglight.plan data=<option> [data.root=...] [plan.time_budget=8m]``."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from seglight.config.plans import made_record, plan_dataset
from seglight.core import console
from seglight.core.errors import reported_errors
from seglight.planning.files import write_plan_files
from seglight.planning.planner import Plan

log = logging.getLogger("seglight")


def plan(cfg: DictConfig) -> Plan:
    """Fingerprint ``cfg.data``, plan training for ``cfg``'s model on it, print both, and write the files."""
    result, fingerprint = plan_dataset(cfg, lambda text: print(text, flush=True))
    output_dir = cfg.get("paths", {}).get("output_dir")
    if output_dir:
        paths = write_plan_files(output_dir, result, fingerprint, made_record(result, fingerprint))
        print(f"Wrote {', '.join(p.name for p in paths.values())} in {output_dir}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    console.setup()
    with reported_errors("seglight.plan"):
        plan(cfg)


if __name__ == "__main__":
    main()
