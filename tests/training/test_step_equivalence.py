"""The path users run (compose + build + fit: the data module's loader, the default callbacks and loggers) trains
exactly as a plain PyTorch loop on the same batches: the same losses, bit for bit the same weights."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from monai.losses import DiceLoss

from seglight import build
from tests.callbacks import RecordStepTensors
from tests.helpers import tiny_config


def test_training_steps_through_the_real_path_equal_a_plain_loop(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "experiment=demo",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "+trainer.limit_val_batches=0",
        "+trainer.num_sanity_val_steps=0",
    )
    torch.manual_seed(0)
    datamodule, module, trainer = build(cfg)
    net = copy.deepcopy(module.net)  # the same initial weights, before any step
    record = RecordStepTensors()
    trainer.callbacks.append(record)
    trainer.fit(module, datamodule=datamodule)
    assert len(record.batches) == trainer.global_step >= 4  # two epochs of at least two steps

    # The plain loop: the reference setting (DiceLoss with sigmoid, Adam at the configured rate), one step per
    # recorded batch, drawing dropout from the same random state as the run's first step.
    loss_fn = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=float(cfg.optimizer.lr))
    net.train()
    torch.set_rng_state(record.rng_state)
    losses = []
    for batch in record.batches:
        loss = loss_fn(net(batch["image"]), batch["label"].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    assert torch.equal(torch.stack(losses), torch.stack(record.losses))
    trained, plain = module.net.state_dict(), net.state_dict()
    assert trained.keys() == plain.keys()
    different = [name for name in trained if not torch.equal(trained[name], plain[name])]
    assert not different, f"weights differ from the plain loop's: {different[:5]}"
