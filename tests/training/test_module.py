"""SegModule on tiny volumes on the CPU: the reference network, loss, metric, optimiser and checkpoints."""

from __future__ import annotations

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
