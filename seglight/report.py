"""What a run tells the user: model size at the start, a summary at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from seglight.module import SegModule
from seglight.utils import atomic_write_text

log = logging.getLogger("seglight")


def describe_model(module: SegModule) -> str:
    """One line: network class and trainable parameter count."""
    return f"Model: {type(module.net).__name__}, {module.num_parameters / 1e6:.2f} M trainable parameters"


def write_summary(trainer: L.Trainer, output_dir: str | Path) -> dict[str, Any]:
    """Print and save (``summary.json``) the best Dice, its checkpoint and how to open TensorBoard."""
    output_dir = Path(output_dir)
    ckpt = trainer.checkpoint_callback
    best_score = getattr(ckpt, "best_model_score", None)
    summary = {
        "best_dice": float(best_score) if best_score is not None else None,
        "best_checkpoint": getattr(ckpt, "best_model_path", "") or None,
        "last_checkpoint": getattr(ckpt, "last_model_path", "") or None,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "interrupted": trainer.interrupted,
        "output_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
        dice = (
            f"{summary['best_dice']:.4f}" if summary["best_dice"] is not None else "n/a (no validation ran)"
        )
        log.info(
            "Done. Best Dice/val %s | best checkpoint: %s | last: %s | see the curves: tensorboard --logdir %s",
            dice,
            summary["best_checkpoint"],
            summary["last_checkpoint"],
            output_dir,
        )
    return summary
