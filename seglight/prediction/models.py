"""The models a prediction runs: checkpoints read safely with the preprocessing they were trained with, what the
models of an ensemble must agree on, and the data settings given instead of a model's own."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai import transforms as mt

from seglight.core.containers import plain
from seglight.core.errors import ConfigError
from seglight.data.datalists import IMAGE
from seglight.data.settings import prediction_settings
from seglight.data.transforms import deterministic_transforms, pipeline_settings
from seglight.training.checkpoints import safe_load
from seglight.training.module import SegModule

log = logging.getLogger("seglight")

# What the models of an ensemble must share: their probabilities are averaged channel by channel, and one
# threshold or argmax turns the mean into label values.
TASK_KEYS = ("in_channels", "out_channels", "label_names", "threshold")


@dataclass
class Model:
    """One model of a prediction: a module in memory, or a checkpoint's settings and weights kept on the CPU (memory
    mapped) until its turn, so an ensemble needs the memory of one network."""

    name: str  # the checkpoint file, or "module"
    settings: dict[str, Any]  # SegModule's constructor arguments (its hyperparameters)
    state_dict: Mapping[str, torch.Tensor] | None = None
    module: SegModule | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The data settings that preprocess its input."""
        return dict(self.settings.get("data") or {})

    @property
    def network(self) -> str:
        """A key of the network config and compute switches: models with equal keys share one network."""
        return json.dumps(
            [self.settings.get("net"), self.settings.get("compute")], sort_keys=True, default=str
        )

    def task(self) -> dict[str, Any]:
        """What an ensemble's models must agree on (see ``TASK_KEYS``)."""
        net = self.settings.get("net") or {}
        names = self.settings.get("label_names") or {}
        return {
            "in_channels": net.get("in_channels"),
            "out_channels": net.get("out_channels", 1),
            "label_names": {int(k): str(v) for k, v in names.items()},
            "threshold": float(self.settings.get("threshold", 0.5)),
        }

    def load_weights(self, module: SegModule) -> SegModule:
        """``module`` with this model's weights (a ConfigError when they do not fit its config)."""
        try:
            module.load_state_dict(dict(self.state_dict or {}), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"ckpt={self.name}: the weights do not fit the saved network config ({first})"
            ) from None
        return module

    def build(self) -> SegModule:
        """The module of a checkpoint model, with its weights, in eval mode."""
        return self.load_weights(SegModule(**self.settings)).eval()


def model_from_checkpoint(path: str | Path) -> Model:
    """A checkpoint file as a ``Model``, read safely (``seglight.training.checkpoints.safe_load``), weights left on disk."""
    checkpoint = safe_load(path, mmap=True)
    hparams = plain(checkpoint.get("hyper_parameters"))
    if not isinstance(hparams, Mapping) or "net" not in hparams:
        raise ConfigError(
            f"ckpt={path}: not a seglight checkpoint (its hyper_parameters have no network config 'net')"
        )
    # As Lightning's load_from_checkpoint does: pass the saved hyperparameters the constructor takes.
    parameters = inspect.signature(SegModule.__init__).parameters
    settings = {k: v for k, v in hparams.items() if k in parameters and k != "self"}
    if not settings.get("data"):  # saved by older versions beside the module, as the data module's settings
        settings["data"] = prediction_settings(checkpoint.get("datamodule_hyper_parameters") or {})
    if not settings["data"]:
        log.warning(
            "ckpt=%s has no saved data settings: using SegDataModule's defaults for the preprocessing", path
        )
    return Model(name=str(path), settings=settings, state_dict=checkpoint["state_dict"])


def load_module(path: str | Path) -> SegModule:
    """A SegModule on the CPU in eval mode, from a checkpoint file read safely; it carries its data settings."""
    return model_from_checkpoint(path).build()


def data_settings(data: Any) -> dict[str, Any]:
    """Prediction settings from a SegDataModule, a mapping of its settings, or a checkpoint file; {} for None."""
    if data is None:
        return {}
    if isinstance(data, str | Path):
        return model_from_checkpoint(data).data
    if callable(getattr(data, "prediction_settings", None)):
        return data.prediction_settings()
    if isinstance(data, Mapping):
        return prediction_settings(data)
    raise ConfigError(
        f"data: expected a SegDataModule, a mapping of its settings or a checkpoint, got {data!r}"
    )


def check_agreement(models: Sequence[Model]) -> None:
    """ConfigError unless every model of an ensemble has the same channels, labels and threshold."""
    first = models[0].task()
    for other in models[1:]:
        task = other.task()
        for key in TASK_KEYS:
            if task[key] != first[key]:
                raise ConfigError(
                    f"ckpt: the models disagree on {key}: {models[0].name} has {first[key]}, {other.name} has "
                    f"{task[key]}; an ensemble averages models trained for the same labels and image channels"
                )


def preprocessing(data: Mapping[str, Any]) -> list[mt.Transform]:
    """The deterministic training transforms for images only, with the saved settings (``pipeline_settings``):
    what prediction runs, and what an exported model's JSON describes."""
    settings = pipeline_settings(data)
    settings.update(image_key=IMAGE, label_key=None)
    return deterministic_transforms(**settings)
