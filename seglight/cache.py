"""Report and prune seglight's caches: ``python -m seglight.cache info|prune|clear [max_gb=20]``."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig

from seglight.core.errors import ConfigError, reported_errors
from seglight.data.caching.files import GB, CacheReport, format_size, inspect_caches, prune

ACTIONS = ("info", "prune", "clear")


def cache(cfg: DictConfig) -> list[CacheReport]:
    """Run ``cfg.action`` on the caches of ``cfg``; returns the caches as they are afterwards."""
    roots = {
        "preprocessed": Path(cfg.preprocessed_dir),
        "remote": Path(cfg.remote_dir),
        "dicom": Path(cfg.dicom_dir),
    }
    action = str(cfg.action)
    if action not in ACTIONS:
        raise ConfigError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if action == "prune":
        if cfg.get("max_gb") is None:
            raise ConfigError("prune needs the size to keep: python -m seglight.cache prune max_gb=<GB>")
        if float(cfg.max_gb) < 0:
            raise ConfigError(f"max_gb must be 0 or more, got {cfg.max_gb}")
    if action != "info":
        limit = 0 if action == "clear" else int(float(cfg.max_gb) * GB)
        result = prune(roots, limit)
        print(f"Removed {result.removed} entries ({format_size(result.removed_bytes)}).")
        if result.in_use_bytes and result.kept_bytes > limit:
            print(f"Kept {format_size(result.in_use_bytes)} in use by running runs (listed below).")
    reports = inspect_caches(roots)
    print(describe(reports))
    return reports


def describe(reports: list[CacheReport]) -> str:
    """One block per cache: folder, entries, size, last use; then the runs using it."""
    lines = []
    now = time.time()
    for report in reports:
        entries = report.entries
        used = f", last used {_ago(now - max(e.last_used for e in entries))} ago" if entries else ""
        lines.append(
            f"{report.kind:<13} {report.root}: {len(entries)} entries, {format_size(report.bytes)}{used}"
        )
        in_use = report.in_use()
        for run in report.runs:
            started = datetime.fromtimestamp(float(run.get("started", 0))).isoformat(timespec="seconds")
            lines.append(f"  in use by pid {run.get('pid', '?')} on {run.get('host', '?')} since {started}")
        if in_use:
            lines.append(
                f"  {len(in_use)} entries ({format_size(sum(e.bytes for e in in_use))}) kept for them"
            )
    total = sum(r.bytes for r in reports)
    lines.append(f"total         {format_size(total)}")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="cache")
def _main(cfg: DictConfig) -> None:
    with reported_errors("seglight.cache"):
        cache(cfg)


def main() -> None:
    """Command-line entry point; the action may come first as a plain word (``seglight-cache prune max_gb=20``)."""
    if len(sys.argv) > 1 and sys.argv[1] in ACTIONS:
        sys.argv[1] = f"action={sys.argv[1]}"
    _main()


if __name__ == "__main__":
    main()
