"""Config -> (datamodule, module, trainer), and ``compose`` for notebooks and tests."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from seglight.errors import ConfigError
from seglight.module import SegModule

log = logging.getLogger("seglight")

CONFIG_MODULE = "seglight.conf"


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    output_dir: str | Path | None = None,
) -> DictConfig:
    """The config the command line would compose for these overrides, ready for ``build`` in a notebook.

    Outside a Hydra run there is no run folder, so ``paths.output_dir`` becomes ``output_dir`` (default: a new
    dated folder under ``outputs/notebook/``).
    """
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    if output_dir is None:
        output_dir = Path("outputs") / "notebook" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(output_dir).resolve())
    return cfg


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, SegModule, L.Trainer]:
    """Instantiate the data module, the module and the trainer that ``cfg`` describes."""
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    return datamodule, module, trainer


def build_module(cfg: DictConfig) -> SegModule:
    """The LightningModule for ``cfg.model``, ``cfg.loss``, ``cfg.optimizer`` (and ``cfg.scheduler`` if any)."""
    return SegModule(
        net=cfg.model,
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
    )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers, on the CPU if CUDA is absent."""
    trainer_cfg = fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg and "_target_" in lg]
    try:
        return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    except Exception as exc:
        raise ConfigError(f"trainer: {exc.__cause__ or exc}") from exc


def fall_back_to_cpu(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Swap a GPU trainer config for the CPU at 32-bit when CUDA is not available, with a one-line notice."""
    cfg = dict(trainer_cfg)
    accelerator = str(cfg.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        log.warning("No CUDA GPU found: training on the CPU at 32-bit precision (trainer.accelerator=cpu).")
        cfg.update(accelerator="cpu", devices=1, precision="32")
        cfg.pop("strategy", None)
        cfg.pop("sync_batchnorm", None)
    elif accelerator == "cpu" and str(cfg.get("precision", "32")).startswith("16"):
        log.warning("16-bit mixed precision needs a GPU: training on the CPU at 32-bit precision instead.")
        cfg["precision"] = "32"
    return cfg


def check_checkpoint_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` if it names an existing file, else a ConfigError that says so."""
    if ckpt_path in (None, ""):
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(path)
