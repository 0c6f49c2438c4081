"""Train a segmentation model: ``python -m seglight.train [overrides]``."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from seglight.build import build, check_checkpoint_path
from seglight.errors import reported_errors
from seglight.report import describe_model, write_summary

log = logging.getLogger("seglight")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model on the configured data; returns the run summary (best Dice, checkpoints)."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = check_checkpoint_path(cfg.get("ckpt_path"))
    datamodule, module, trainer = build(cfg)
    log.info(describe_model(module))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return write_summary(trainer, cfg.paths.output_dir)


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    with reported_errors("seglight.train"):
        train(cfg)


if __name__ == "__main__":
    main()
