"""SegModule on tiny volumes on the CPU: the reference network, loss, metric, optimiser and checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from seglight import SegModule
from seglight.core.errors import ConfigError

TINY_NET = {
    "_target_": "monai.networks.nets.SegResNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "init_filters": 8,
}


def cube_batch(size: int = 16) -> dict[str, torch.Tensor]:
    label = torch.zeros(2, 1, size, size, size)
    label[:, :, 4:12, 4:12, 4:12] = 1
    return {"image": label * 0.8 + 0.1 * torch.rand_like(label), "label": label}


def test_reference_network_has_about_4_7_million_parameters() -> None:
    module = SegModule()
    assert type(module.net).__name__ == "SegResNet"
    assert 4.6e6 < module.num_parameters < 4.8e6
    assert module.hparams.optimizer["lr"] == pytest.approx(1e-4)


def test_training_step_backpropagates_and_learns_a_cube() -> None:
    torch.manual_seed(0)
    module = SegModule(
        net=TINY_NET, optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
    )
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    batch = cube_batch()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = module.loss_fn(module(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)


def test_dice_metric_uses_sigmoid_threshold() -> None:
    module = SegModule(net=TINY_NET)
    label = cube_batch()["label"]
    perfect_logits = (label * 2 - 1) * 10.0  # sigmoid > 0.5 exactly on the cube
    module.dice(module.class_masks(module.labels(module.probabilities(perfect_logits))), label)
    assert module.dice.aggregate().item() == pytest.approx(1.0)
    module.dice.reset()
    half = perfect_logits.clone()
    half[:, :, 4:8] = -10.0  # half of the cube missed: Dice = 2*0.5/(0.5+1) = 2/3
    module.dice(module.class_masks(module.labels(module.probabilities(half))), label)
    assert module.dice.aggregate().item() == pytest.approx(2 / 3, abs=1e-6)


def test_load_from_checkpoint_needs_no_config(tmp_path: Path) -> None:
    module = SegModule(net=TINY_NET)
    trainer = L.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = SegModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.net == TINY_NET
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unknown_network_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="monai.networks.nets.NoSuchNet"):
        SegModule(net={"_target_": "monai.networks.nets.NoSuchNet"})


# A checkpoint's hyper_parameters exactly as the released version (before the package was split into
# sub-packages) wrote them: run_patch's last.ckpt of `experiment=patch` (DynUNet, cosine schedule, windows).
RELEASED_HPARAMS = {
    "net": {
        "_target_": "monai.networks.nets.DynUNet",
        "deep_supervision": False,
        "filters": [8, 16, 32, 32],
        "in_channels": 1,
        "kernel_size": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 1]],
        "out_channels": 1,
        "res_block": True,
        "spatial_dims": 3,
        "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [1, 1, 2]],
        "upsample_kernel_size": [[2, 2, 1], [2, 2, 2], [1, 1, 2]],
    },
    "loss": {"_target_": "monai.losses.DiceCELoss", "lambda_ce": 1.0, "lambda_dice": 1.0, "sigmoid": True},
    "optimizer": {"_partial_": True, "_target_": "torch.optim.Adam", "lr": 0.001, "weight_decay": 0.0},
    "scheduler": {
        "interval": "epoch",
        "scheduler": {
            "T_max": "auto",
            "_partial_": True,
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "eta_min": 0.0,
        },
    },
    "threshold": 0.5,
    "label_names": {0: "background", 1: "organ"},
    "inference": {
        "device": None,
        "mode": "gaussian",
        "overlap": 0.5,
        "roi_size": [16, 16, 16],
        "sw_batch_size": 4,
        "sw_device": None,
    },
    "metrics": {"hd95": True, "hd95_every_n": 1, "surface_dice_tolerance": None},
    "compute": {"channels_last": False, "checkpointing": False, "compile": False},
    "data": {
        "a_max": 1000.0,
        "a_min": -1000.0,
        "image_key": "image",
        "image_pattern": "*/img.nii.gz",
        "label_key": "label",
        "label_pattern": "*/label.nii.gz",
        "layout": "auto",
        "mode": "patch",
        "orientation": "RAS",
        "spatial_size": [64, 64, 32],
        "target_spacing": None,
    },
}


def test_hyper_parameters_of_the_released_version_load(tmp_path: Path) -> None:
    saved = SegModule(**copy.deepcopy(RELEASED_HPARAMS))
    assert dict(saved.hparams) == RELEASED_HPARAMS  # and today's module saves them in the same form
    path = tmp_path / "released.ckpt"
    torch.save(
        {
            "state_dict": saved.state_dict(),
            "hyper_parameters": copy.deepcopy(RELEASED_HPARAMS),
            "pytorch-lightning_version": "2.6.6",
        },
        path,
    )
    module = SegModule.load_from_checkpoint(path, map_location="cpu")
    assert dict(module.hparams) == RELEASED_HPARAMS and type(module.net).__name__ == "DynUNet"
    assert module.infer(torch.rand(1, 1, 24, 24, 16)).shape == (1, 1, 24, 24, 16)  # sliding windows of 16
    module.trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False)
    configured = module.configure_optimizers()
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 3
    assert configured["lr_scheduler"]["interval"] == "epoch"
