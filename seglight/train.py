"""Train a segmentation model: ``python -m seglight.train [overrides]``."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from seglight.config.builder import build, plan_file_arguments
from seglight.config.plans import with_plan
from seglight.config.sweeps import is_multirun, run_job
from seglight.core import console
from seglight.core.errors import DiskFullError, reported_errors
from seglight.core.io import is_disk_full
from seglight.evaluation.scoring import evaluate_after_training
from seglight.training.callbacks.preemption import stop_at_signals
from seglight.training.checkpoints import checkpoint_dir, resolve_checkpoint
from seglight.training.distributed import join_run, leave_run, resume_requested, stop_unless_launchable
from seglight.training.run_records import describe_model, write_run_info, write_summary
from seglight.training.trackers import finish_trackers, repair_run_trackers, run_disk_full

log = logging.getLogger("seglight")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model on the configured data; returns the run summary (best Dice, checkpoints)."""
    started = time.monotonic()
    join_run()  # one of several processes: find the others, and leave the reporting to rank 0
    # SIGTERM/Ctrl-C outside the training loop (data set-up, downloads, test predictions) stops at once, 143/130.
    with stop_at_signals():
        cfg = with_plan(
            cfg, budget_start=started
        )  # plan=auto plans now (its time comes out of plan.time_budget)
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg)
        stop_unless_launchable(trainer, is_multirun())
        ckpt_path = resolve_checkpoint(
            cfg.get("ckpt_path"),
            resume_requested(cfg.get("resume", False), cfg.get("ckpt_path")),
            checkpoint_dir(trainer),
            module,
            run_dir=trainer.default_root_dir,
            clean_up=trainer.is_global_zero,
        )
        if ckpt_path:
            console.resuming()
        if trainer.is_global_zero:
            repair_run_trackers(trainer)  # what a killed session left half-written, before appending
            write_run_info(cfg, cfg.paths.output_dir, resumed_from=ckpt_path)
        log.info(describe_model(module))
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            # Steps after fitting (e.g. evaluation on a test split) belong here, before the summary that reports them.
            if cfg.get("test") and trainer.is_global_zero:
                # Predict the held-out cases with the best checkpoint and score them into <run>/test/ (rank 0 alone).
                evaluate_after_training(trainer, datamodule, cfg.paths.output_dir)
        except SIGTERMException:
            # SIGTERM or Ctrl-C: the Preemption callback saved last.ckpt (during training) and set the exit status.
            write_summary(trainer, cfg.paths.output_dir, "interrupted", time.monotonic() - started)
            leave_run()  # every process stopped at the same step: none is left in a collective
            raise
        except Exception as exc:
            if isinstance(exc, DiskFullError) or not is_disk_full(exc):
                raise
            # A full disk met by a tracker's or a logger's own write (atomic_path reports those it makes).
            raise run_disk_full(trainer, exc) from None
        finish_trackers(trainer)
        summary = write_summary(trainer, cfg.paths.output_dir, "completed", time.monotonic() - started)
    leave_run()
    return summary


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="train")
def run(cfg: DictConfig) -> float | None:
    """The Hydra app; returns the best Dice/val, the objective of sweepers such as Optuna."""
    console.setup()
    with reported_errors("seglight.train"):
        return run_job(train, cfg).get("best_dice")


def main() -> None:
    """Command-line entry point: ``plan=<file>`` becomes the overrides that compose the file, then Hydra runs."""
    with reported_errors("seglight.train"):
        sys.argv[1:] = plan_file_arguments(sys.argv[1:])
    run()


if __name__ == "__main__":
    main()
