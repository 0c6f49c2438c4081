"""SegModule: a MONAI network with its loss, Dice metric, optimiser and logging, as a LightningModule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from monai.metrics import DiceMetric
from omegaconf import DictConfig, OmegaConf
from torch import nn

from seglight.errors import ConfigError

DEFAULT_NET = {
    "_target_": "monai.networks.nets.SegResNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "init_filters": 16,
    "dropout_prob": 0.2,
}
DEFAULT_LOSS = {"_target_": "monai.losses.DiceLoss", "sigmoid": True}
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}


class SegModule(L.LightningModule):
    """Binary 3D segmentation: sigmoid outputs, Dice loss, Dice metric on ``sigmoid > threshold``.

    The network, loss and optimiser are given as configs (``_target_`` plus arguments, as in ``conf/``), so they
    are saved with the checkpoint and ``SegModule.load_from_checkpoint(path)`` needs nothing else.

    Args:
        net: config of any ``monai.networks.nets`` class (or other ``nn.Module``).
        loss: config of the loss, called as ``loss(logits, target)``.
        optimizer: partial config of a ``torch.optim`` optimiser, completed with the parameters.
        scheduler: optional partial config of an LR scheduler, completed with the optimiser.
        threshold: probability above which a voxel is foreground for the metric and predictions.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "net": _plain(net if net is not None else DEFAULT_NET),
                "loss": _plain(loss if loss is not None else DEFAULT_LOSS),
                "optimizer": _plain(optimizer if optimizer is not None else DEFAULT_OPTIMIZER),
                "scheduler": _plain(scheduler),
                "threshold": float(threshold),
            }
        )
        self.net = build_network(self.hparams.net)
        self.loss_fn = instantiate(self.hparams.loss)
        self.dice = DiceMetric(include_background=False, reduction="mean")

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the network."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        loss = self.loss_fn(self(image), label)
        self.log("Loss/train", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        logits = self(image)
        self.log(
            "Loss/val", self.loss_fn(logits, label), on_step=False, on_epoch=True, batch_size=image.shape[0]
        )
        self.dice(self.binarize(logits), label)

    def on_validation_epoch_end(self) -> None:
        dice = self.dice.aggregate().item()
        self.dice.reset()
        self.log("Dice/val", dice, prog_bar=True, sync_dist=True)

    def binarize(self, logits: torch.Tensor) -> torch.Tensor:
        """Foreground mask from logits: ``sigmoid(logits) > threshold``."""
        return (torch.sigmoid(logits.float()) > self.hparams.threshold).float()

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler_cfg = dict(self.hparams.scheduler)
        interval = scheduler_cfg.pop("interval", "epoch")
        scheduler = instantiate(scheduler_cfg)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a network config, turning a wrong ``_target_`` or argument into a ConfigError."""
    target = config.get("_target_", "<no _target_>") if isinstance(config, Mapping) else config
    try:
        net = instantiate(config)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"model: cannot build {target}: {cause}") from exc
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model: {target} is not a torch.nn.Module")
    return net


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value
