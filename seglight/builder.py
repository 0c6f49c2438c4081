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
from lightning.fabric.plugins import CheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from seglight.checkpointing import AtomicCheckpointIO
from seglight.data.transforms import oriented_geometry
from seglight.errors import ConfigError
from seglight.module import SegModule
from seglight.networks import class_name, normalises_over_batch, resolve_network_config

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
    module = build_module(cfg, datamodule)
    match_data_to_model(datamodule, module)
    trainer = build_trainer(cfg)
    return datamodule, module, trainer


def match_data_to_model(datamodule: L.LightningDataModule, module: SegModule) -> None:
    """Tell the data module what the model needs from the data, for its checks and its training loader.

    Label values must lie in 0..C-1 for the model's C classes (checked when each case is first read), and a
    network with BatchNorm must never get a training batch of one case (the loader drops such a last batch).
    """
    if hasattr(datamodule, "num_classes"):
        datamodule.num_classes = module.num_classes
    if hasattr(datamodule, "avoid_batches_of_one"):
        datamodule.avoid_batches_of_one = normalises_over_batch(module.net)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule | None = None) -> SegModule:
    """The LightningModule for ``cfg.model``, ``cfg.loss``, ``cfg.optimizer`` (and ``cfg.scheduler`` if any).

    The network's ``auto`` values come from the data (``datamodule``, or one made from ``cfg.data``): input
    channels from the images, output channels from the labels (1 with sigmoid for one foreground label, one per
    label with softmax for several), DynUNet's kernels and strides and UNETR's input size from the size the
    network sees. In patch mode, validation slides windows of ``data.patch_size`` over whole volumes.
    """
    if datamodule is None and cfg.get("data") is not None:
        datamodule = instantiate(cfg.data, _convert_="all")
    net = OmegaConf.to_container(cfg.model, resolve=True)
    inference = OmegaConf.to_container(cfg.inference, resolve=True) if cfg.get("inference") else {}
    label_names: dict[int, str] = {}
    if datamodule is not None:
        label_names = data_label_names(datamodule)
        size, option, patch = network_input_size(datamodule)
        spacing = network_input_spacing(datamodule) if class_name(net) == "DynUNet" else None
        net = resolve_network_config(
            net, getattr(datamodule, "num_input_channels", 1), label_names, size, option, spacing
        )
        inference["roi_size"] = size if patch else None
    return SegModule(
        net=net,
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        label_names=label_names,
        inference=inference,
        metrics=cfg.get("metrics"),
    )


def data_label_names(datamodule: L.LightningDataModule) -> dict[int, str]:
    """The dataset's label values and names (background included); the demo is generated first if need be."""
    names = getattr(datamodule, "label_names", {}) or {}
    if not names and getattr(datamodule, "demo", None) is not None:
        datamodule.prepare_data()  # the demo's dataset.json is written on first use
        names = datamodule.label_names
    return dict(names)


def network_input_size(datamodule: L.LightningDataModule) -> tuple[list[int], str, bool]:
    """(size the network sees, the option that sets it, whether validation slides windows over volumes)."""
    if getattr(datamodule, "mode", "resize") == "patch":
        return list(datamodule.patch_size), "data.patch_size", True
    return list(datamodule.spatial_size), "data.spatial_size", False


def network_input_spacing(datamodule: L.LightningDataModule) -> list[float] | None:
    """Voxel spacing (mm) of what the network sees, from the first case's header; None if unreadable."""
    if getattr(datamodule, "mode", "resize") == "patch" and datamodule.target_spacing is not None:
        return list(datamodule.target_spacing)
    try:
        case = datamodule.read_cases()[0]
        path = case["image"][0] if isinstance(case["image"], list) else case["image"]
        shape, spacing = oriented_geometry(str(path), getattr(datamodule, "orientation", "RAS"))
    except Exception as exc:  # remote or unreadable: DynUNet falls back to isotropic planning
        log.info("Spacing for DynUNet planning unknown (%s): assuming isotropic voxels", exc)
        return None
    if getattr(datamodule, "mode", "resize") == "patch":
        return spacing
    return [s * n / m for s, n, m in zip(spacing, shape, datamodule.spatial_size, strict=True)]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers, on the CPU if CUDA is absent."""
    trainer_cfg = fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg and "_target_" in lg]
    # Checkpoints are written to a temporary name and renamed: a kill mid-write never truncates last.ckpt.
    plugins = list(trainer_cfg.pop("plugins", None) or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    try:
        return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)
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
