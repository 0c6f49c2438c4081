"""Config -> (datamodule, module, trainer), and ``compose`` for notebooks and tests."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from omegaconf import DictConfig, OmegaConf, open_dict

from seglight.core.console import interactive
from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.data import SegDataModule
from seglight.data.remote import default_cache_dir
from seglight.data.settings import ModelNeeds
from seglight.models.networks import class_name, normalises_over_batch, resolve_network_config
from seglight.planning.files import plan_arguments, plan_record
from seglight.training.callbacks.epoch_log import EpochLog
from seglight.training.callbacks.experiment_tracking import ExperimentTracking
from seglight.training.callbacks.model_summary import ModelSummary
from seglight.training.checkpoints import AtomicCheckpointIO
from seglight.training.distributed import cluster_plugins
from seglight.training.module import SegModule
from seglight.training.trackers import build_loggers, config_dict, run_settings

log = logging.getLogger("seglight")

CONFIG_MODULE = "seglight.conf"


def compose(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    output_dir: str | Path | None = None,
) -> DictConfig:
    """The config the command line would compose for these overrides, ready for ``build`` in a notebook.

    Outside a Hydra run there is no run folder, so ``paths.output_dir`` becomes ``output_dir`` (default: a new
    dated folder under ``outputs/notebook/``). ``plan=<file>`` composes a plan file as the command line does; with
    a plan, the overrides are recorded in ``plan.given``, so that the plan leaves the keys they set alone.
    """
    overrides = plan_arguments(list(overrides), plans_dir())
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    if cfg.get("plan"):
        with open_dict(cfg):
            cfg.plan.given = list(overrides)
    if "paths" not in cfg:
        return cfg  # an application without a run folder (evaluate's, viz's)
    if output_dir is None:
        output_dir = Path("outputs") / "notebook" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(output_dir).resolve())
    return cfg


def plans_dir() -> Path:
    """Where plan files given as ``plan=<file>`` are copied to be composed (by content, so reruns share them)."""
    return default_cache_dir() / "plans"


def plan_file_arguments(arguments: Sequence[str]) -> list[str]:
    """Command-line overrides with ``plan=<file>`` turned into the overrides that compose that file."""
    return plan_arguments(arguments, plans_dir())


def build(cfg: DictConfig) -> tuple[SegDataModule, SegModule, L.Trainer]:
    """Instantiate the data module, the module and the trainer that ``cfg`` describes."""
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg, datamodule)
    if isinstance(datamodule, SegDataModule):
        datamodule.for_model(model_needs(module))
    trainer = build_trainer(cfg, datamodule)
    return datamodule, module, trainer


def model_needs(module: SegModule) -> ModelNeeds:
    """What the model decides about its data, for the data module's checks and its training loader.

    Label values must lie in 0..C-1 for the model's C classes (checked when each case is first read), and a
    network with BatchNorm must never get a training batch of one case (the loader drops such a last batch).
    """
    return ModelNeeds(num_classes=module.num_classes, avoid_batches_of_one=normalises_over_batch(module.net))


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule | None = None) -> SegModule:
    """The LightningModule for ``cfg.model``, ``cfg.loss``, ``cfg.optimizer`` (and ``cfg.scheduler`` if any).

    The network's ``auto`` values come from the data (``datamodule``, or one made from ``cfg.data``): input
    channels from the images, output channels from the labels (1 with sigmoid for one foreground label, one per
    label with softmax for several), DynUNet's kernels and strides and UNETR's input size from what the network
    sees. In patch mode, validation slides windows of ``data.patch.size`` over whole volumes. The data module's
    prediction settings are saved with the module, so that its checkpoints predict on their own, and so is the
    record of a plan the run was trained with (``plan=auto`` or ``plan=<file>``).
    """
    if datamodule is None and cfg.get("data") is not None:
        datamodule = instantiate(cfg.data, _convert_="all")
    net = OmegaConf.to_container(cfg.model, resolve=True)
    inference = plain(cfg.get("inference")) or {}
    label_names: dict[int, str] = {}
    data: dict[str, Any] = {}
    if datamodule is not None:
        label_names = data_label_names(datamodule)
        seen = datamodule.network_input()
        if class_name(net) == "DynUNet" and seen.spacing is None:
            log.info("Voxel spacing unknown before the data is read: DynUNet is planned for isotropic voxels")
        net = resolve_network_config(
            net, datamodule.num_input_channels, label_names, seen.size, seen.option, seen.spacing
        )
        if inference.get("roi_size") is None and seen.sliding_window:
            inference["roi_size"] = seen.size
        data = datamodule.prediction_settings()
    return SegModule(
        net=net,
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        label_names=label_names,
        inference=inference,
        metrics=cfg.get("metrics"),
        compute=cfg.get("compute"),
        data=data,
        plan=plan_record(plain(cfg.get("plan"))),
    )


def data_label_names(datamodule: SegDataModule) -> dict[int, str]:
    """The dataset's label values and names (background included); the demo is generated first if need be."""
    names = datamodule.label_names
    if not names and datamodule.demo is not None:
        datamodule.prepare_data()  # the demo's dataset.json is written on first use
        names = datamodule.label_names
    return dict(names)


def build_trainer(cfg: DictConfig, datamodule: L.LightningDataModule | None = None) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers, on the CPU if CUDA is absent.

    With seglight's data module, Lightning does not add its DistributedSampler: the data module's loaders give
    each process its share themselves (and pad nothing in validation). Other data modules keep Lightning's.
    """
    trainer_cfg = fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
    if isinstance(datamodule, SegDataModule):
        trainer_cfg["use_distributed_sampler"] = False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    loggers = build_loggers(cfg.get("logger"))
    if loggers:
        callbacks.append(ExperimentTracking(config_dict(cfg), run_settings(cfg)))
    else:  # logger=none: Lightning refuses a learning-rate monitor without a logger; the epoch line shows it
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # A progress bar where a person watches, one line per epoch in logs; Lightning's summary as one line.
    trainer_cfg, callbacks = trainer_output(trainer_cfg, callbacks)
    # Checkpoints are written to a temporary name and renamed: a kill mid-write never truncates last.ckpt.
    plugins = list(trainer_cfg.pop("plugins", None) or []) + cluster_plugins()
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    try:
        return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    except Exception as exc:
        raise ConfigError(f"trainer: {exc.__cause__ or exc}") from exc


def fall_back_to_cpu(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Swap a GPU trainer config for the CPU at 32-bit when CUDA is not available, with a one-line notice.

    A data-parallel config (``trainer=ddp``) stays data-parallel: ``trainer.devices`` CPU processes that talk
    over gloo, as the tests and a laptop rehearsal of a cluster run need. FSDP cannot run on the CPU (Lightning
    refuses it): a ConfigError says so.
    """
    cfg = dict(trainer_cfg)
    accelerator = str(cfg.get("accelerator", "auto")).lower()
    wants_gpu = accelerator in ("gpu", "cuda")
    if is_fsdp(cfg.get("strategy")) and (accelerator == "cpu" or not torch.cuda.is_available()):
        raise ConfigError(
            "trainer=fsdp needs CUDA GPUs (Lightning's FSDP does not run on the CPU); on this machine use "
            "trainer=ddp, or trainer=cpu"
        )
    if wants_gpu and not torch.cuda.is_available():
        cfg.update(accelerator="cpu", precision="32")
        if is_data_parallel(cfg.get("strategy")):
            log.warning(
                "No CUDA GPU found: data-parallel training in %s CPU process(es) over gloo at 32-bit precision.",
                cfg.get("devices", 1),
            )
            if cfg.pop("sync_batchnorm", None):
                log.info("SyncBatchNorm needs GPUs: each CPU process keeps its own BatchNorm statistics.")
        else:
            log.warning(
                "No CUDA GPU found: training on the CPU at 32-bit precision (trainer.accelerator=cpu)."
            )
            cfg["devices"] = 1
            cfg.pop("strategy", None)
            cfg.pop("sync_batchnorm", None)
    elif accelerator == "cpu" and str(cfg.get("precision", "32")).startswith("16"):
        log.warning("16-bit mixed precision needs a GPU: training on the CPU at 32-bit precision instead.")
        cfg["precision"] = "32"
    return cfg


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, dict):
        return str(strategy.get("_target_", "")).lower()
    return str(type(strategy).__name__ if not isinstance(strategy, str) else strategy).lower()


def is_fsdp(strategy: Any) -> bool:
    """Whether a trainer's ``strategy`` (a name, a ``_target_`` config or an object) is FSDP."""
    return strategy is not None and "fsdp" in _strategy_name(strategy)


def is_data_parallel(strategy: Any) -> bool:
    """Whether a trainer's ``strategy`` runs several processes (DDP in any of its forms, or FSDP)."""
    return strategy is not None and any(k in _strategy_name(strategy) for k in ("ddp", "fsdp"))


def trainer_output(
    trainer_cfg: dict[str, Any], callbacks: Iterable[Callback]
) -> tuple[dict[str, Any], list[Callback]]:
    """The trainer arguments and callbacks for what a run shows.

    ``enable_progress_bar`` null (the default) means a progress bar where a person watches (a terminal, Jupyter)
    and one line per epoch elsewhere; true or false is the user's choice and wins. The epoch lines always go to
    the run's log file. Lightning's model summary becomes seglight's one line.
    """
    cfg = dict(trainer_cfg)
    callbacks = list(callbacks)
    bar = cfg.get("enable_progress_bar")
    if bar is None or str(bar).lower() == "auto":
        bar = interactive()
    cfg["enable_progress_bar"] = bool(bar)
    if not any(isinstance(c, EpochLog) for c in callbacks):
        callbacks.append(EpochLog(console=not bar))
    if cfg.get("enable_model_summary", True) and not any(
        isinstance(c, LightningModelSummary) for c in callbacks
    ):
        callbacks.append(ModelSummary())
    cfg["enable_model_summary"] = False  # the summary, if any, is in the callbacks now
    return cfg, callbacks
