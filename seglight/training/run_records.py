"""What a run tells the user: model size at the start, where it came from (``run_info.json``), and its summary at
the end (``summary.json``, whose schema is ``seglight.training.summary.RunSummary``)."""

from __future__ import annotations

import json
import logging
import platform
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from seglight.core.io import atomic_write_text
from seglight.core.versions import git_state, package_versions
from seglight.training.checkpoints import checkpoint_epoch
from seglight.training.module import SegModule
from seglight.training.summary import RunSummary

log = logging.getLogger("seglight")


def describe_model(module: SegModule) -> str:
    """One line: network class and trainable parameter count."""
    return f"Model: {type(module.net).__name__}, {module.num_parameters / 1e6:.2f} M trainable parameters"


def write_summary(
    trainer: L.Trainer,
    output_dir: str | Path,
    status: str = "completed",
    wall_time_s: float | None = None,
) -> dict[str, Any]:
    """Print and save (``summary.json``) the best Dice, its epoch and checkpoint, the time validation took, and
    how to open TensorBoard."""
    output_dir = Path(output_dir)
    ckpt = trainer.checkpoint_callback
    module = trainer.lightning_module
    validation_s = getattr(module, "validation_time_s", None)
    best_score = getattr(ckpt, "best_model_score", None)
    best_checkpoint = getattr(ckpt, "best_model_path", "") or None
    record = RunSummary(
        status=status,
        best_dice=float(best_score) if best_score is not None else None,
        best_epoch=checkpoint_epoch(best_checkpoint),
        best_checkpoint=best_checkpoint,
        last_checkpoint=getattr(ckpt, "last_model_path", "") or None,
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        interrupted=trainer.interrupted,
        wall_time_s=round(wall_time_s, 1) if wall_time_s is not None else None,
        # This session's validations (the sanity check excluded): their count and total wall time.
        validations=getattr(module, "validations", None),
        validation_time_s=round(validation_s, 1) if validation_s is not None else None,
        output_dir=str(output_dir),
    )
    summary = record.as_dict()
    if trainer.is_global_zero:
        record.write(output_dir)
        dice = (
            f"{summary['best_dice']:.4f} (epoch {summary['best_epoch']})"
            if summary["best_dice"] is not None
            else "n/a (no validation ran)"
        )
        log.info(
            "%s. Best Dice/val %s | %s | best checkpoint: %s | last: %s | see the curves: tensorboard --logdir %s",
            "Done" if status == "completed" else status.capitalize(),
            dice,
            validation_share(validation_s, wall_time_s),
            summary["best_checkpoint"],
            summary["last_checkpoint"],
            output_dir,
        )
    return summary


def validation_share(validation_s: float | None, wall_time_s: float | None) -> str:
    """``validation 12.3 s of 95.0 s (13%)``: how much of the run validation took."""
    if validation_s is None:
        return "validation time unknown"
    if not wall_time_s:
        return f"validation {validation_s:.1f} s"
    return f"validation {validation_s:.1f} s of {wall_time_s:.1f} s ({100 * validation_s / wall_time_s:.0f}%)"


def write_run_info(
    cfg: DictConfig, output_dir: str | Path, resumed_from: str | None = None
) -> dict[str, Any]:
    """Append this session (seed, versions, git commit, command, checkpoint resumed from) to ``run_info.json``.

    The composed config itself is in ``.hydra/config.yaml``; a resumed run adds a session instead of
    overwriting the first one.
    """
    path = Path(output_dir) / "run_info.json"
    session = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "seed": cfg.get("seed"),
        "resumed_from": resumed_from,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "packages": package_versions(),
        "git": git_state(),
    }
    record: dict[str, Any] = {"sessions": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            record.setdefault("sessions", [])
        except (OSError, ValueError):
            record = {"sessions": []}
    record["sessions"].append(session)
    atomic_write_text(path, json.dumps(record, indent=2))
    return session
