"""Several labels at once: softmax over one-hot targets, every loss option, per-label Dice in TensorBoard, and
label maps that do not match the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglight import SegModule, compose
from seglight.models.losses import loss_for_task
from tests.helpers import make_msd_dataset, run_cli, tiny_overrides, train_in_process, write_nifti

TINY_NET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "channels": [8, 16],
    "strides": [2],
    "num_res_units": 1,
}


@pytest.mark.parametrize("loss", ["dice", "dicece", "dicefocal"])
def test_each_loss_learns_binary_and_multiclass(loss: str, tmp_path: Path) -> None:
    cfg_loss = compose([f"loss={loss}"], output_dir=tmp_path).loss
    torch.manual_seed(0)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 2:8, 2:8, 2:8] = 1
    label[:, :, 9:14, 9:14, 9:14] = 2
    image = label / 2 + 0.05 * torch.randn_like(label)
    for out_channels, target in ((1, (label == 1).float()), (3, label)):
        module = SegModule(
            net={**TINY_NET, "out_channels": out_channels},
            loss=cfg_loss,
            optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
        )
        activation = module.hparams.loss.get("softmax") or False
        assert activation is (out_channels > 1)
        optimizer = module.configure_optimizers()
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            value = module.loss_fn(module(image), target)
            value.backward()
            optimizer.step()
            losses.append(value.item())
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_loss_activation_follows_the_output_channels() -> None:
    dice = {"_target_": "monai.losses.DiceLoss", "sigmoid": True}
    assert loss_for_task(dice, softmax=False) == dice
    assert loss_for_task(dice, softmax=True) == {
        "_target_": "monai.losses.DiceLoss",
        "softmax": True,
        "to_onehot_y": True,
    }
    # A user's softmax for one output channel cannot work: it becomes sigmoid.
    assert loss_for_task({"_target_": "x", "softmax": True}, softmax=False) == {
        "_target_": "x",
        "sigmoid": True,
    }
    # Losses without an activation switch are left as they are.
    assert loss_for_task({"_target_": "torch.nn.BCEWithLogitsLoss"}, softmax=True) == {
        "_target_": "torch.nn.BCEWithLogitsLoss"
    }


def test_label_value_the_model_has_no_channel_for_names_the_case(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    # dataset.json declares one foreground label, but one label map also holds a 2.
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad = root / "labelsTr" / "case_1.nii.gz"
    label = np.zeros((20, 20, 12), np.uint8)
    label[4:12, 5:13, 3:9] = 1
    label[14:18, 14:18, 2:5] = 2
    write_nifti(bad, label)
    status = train_in_process(
        [
            "data=msd",
            f"data.root={root}",
            "data.spatial_size=[16,16,8]",
            "data.num_workers=0",
            "data.val_fraction=0.34",
            "data.batch_size=1",
            "model.init_filters=8",
            "trainer.max_epochs=1",
        ],
        tmp_path / "run",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    # Found while the cache fills, with the dataset check's line naming the file (not at a training step).
    assert err[0] == f"seglight.train: error: {bad}: label values 2 are not among the declared labels (0, 1)"


@pytest.mark.slow
def test_multiclass_demo_run_logs_dice_per_label(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "seglight.train",
        "experiment=multiclass",
        *tiny_overrides(run_dir),
        "data.spatial_size=[24,24,16]",
        "metrics.surface_dice_tolerance=2.0",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads(next(cache_dir.glob("demo/*_l2_*/dataset.json")).read_text())
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "cyst"}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Dice/val", "Dice/val/organ", "Dice/val/cyst", "HD95/val", "NSD/val", "Loss/train"} <= tags
    for tag in ("Dice/val/organ", "Dice/val/cyst"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    hd95 = [e.value for e in events.Scalars("HD95/val")]
    assert all(np.isfinite(hd95)) and all(v >= 0 for v in hd95)
    # Dice/val is the mean over the labels (MONAI's reduction), per validation epoch.
    organ, cyst, mean = (events.Scalars(t)[-1].value for t in ("Dice/val/organ", "Dice/val/cyst", "Dice/val"))
    assert min(organ, cyst) - 1e-6 <= mean <= max(organ, cyst) + 1e-6

    # The checkpoint alone rebuilds the three-channel softmax model.
    model = SegModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.softmax and model.num_classes == 3 and model.class_names == ["organ", "cyst"]
    assert model.hparams.loss["_target_"] == "monai.losses.DiceCELoss" and model.hparams.loss["to_onehot_y"]
    with torch.no_grad():
        labels = model.eval().labels(model.probabilities(model(torch.rand(1, 1, 24, 24, 16))))
    assert labels.shape == (1, 1, 24, 24, 16) and int(labels.max()) <= 2
