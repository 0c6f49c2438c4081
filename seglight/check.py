"""Check a dataset before training on it: ``python -m seglight.check data=<option> [data.root=...]``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from seglight.core.console import setup as setup_console
from seglight.core.errors import DataError, reported_errors
from seglight.core.io import atomic_write_text

log = logging.getLogger("seglight")


def check(cfg: DictConfig) -> Any:
    """Inspect every voxel of every case of ``cfg.data``; print the summary and every problem; raise if any.

    Returns the ``DatasetReport``; also saved as ``check_report.json`` in the run folder.
    """
    from seglight.data.loaders import available_cpus

    datamodule = instantiate(cfg.data, _convert_="all")
    if getattr(datamodule, "demo", None) is not None:
        datamodule.prepare_data()  # the demo is generated on first use
    _, report = datamodule.inspect(full=True, workers=cfg.get("workers") or available_cpus())
    print(report.summary())
    if datamodule.remote_cache.downloaded or datamodule.remote_cache.cache_dir.is_dir():
        print(f"  remote file cache: {datamodule.remote_cache.usage()}")
    for finding in report.warnings:
        print(f"warning: {finding}")
    for finding in report.errors:
        print(f"error: {finding}")
    output_dir = cfg.get("paths", {}).get("output_dir")
    if output_dir:
        atomic_write_text(Path(output_dir) / "check_report.json", json.dumps(report.to_dict(), indent=2))
    if report.errors:
        bad = len(report.bad_cases())
        raise DataError(
            f"{len(report.errors)} problem(s) in {bad} of {report.num_cases} cases (each listed above with its file)"
        )
    print(f"OK: {report.num_cases} cases passed ({len(report.warnings)} warning(s))")
    return report


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="check")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.check"):
        check(cfg)


if __name__ == "__main__":
    main()
