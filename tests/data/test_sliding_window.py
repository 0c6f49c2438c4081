"""Patch mode: native-resolution patches for training, whole volumes by sliding window for validation, on real
NIfTI files through the real SegDataModule and Lightning's validation loop."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from seglight import SegDataModule, SegModule
from seglight.core.errors import ConfigError
from tests.helpers import train_in_process, write_nifti

SHAPE = (40, 36, 24)  # larger than the 16^3 patch along every axis
SPACING = (1.0, 1.0, 2.0)
PATCH = [16, 16, 16]


def make_dataset(root: Path, num_cases: int = 3, two_labels: bool = False) -> Path:
    """Noisy CT-like volumes (air, a body, a bright organ labelled 1, and a dark cyst labelled 2 if asked)."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(num_cases):
        image = np.full(SHAPE, -200.0, np.float32) + rng.normal(0, 30, SHAPE).astype(np.float32)
        image[:, :, :3] = -1000.0  # air below the body: background patches are drawn only where image > 0
        label = np.zeros(SHAPE, np.uint8)
        x0 = 8 + 4 * i
        label[x0 : x0 + 12, 10:22, 8:16] = 1
        if two_labels:
            label[28:34, 24:30, 14:20] = 2
        image[label == 1] += 400.0
        image[label == 2] -= 150.0
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", image, spacing=SPACING)
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, spacing=SPACING)
        training.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    labels = {"0": "background", "1": "organ", **({"2": "cyst"} if two_labels else {})}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    return root


def patch_datamodule(root: Path, patch: dict | None = None, **options) -> SegDataModule:
    settings = dict(
        root=str(root), mode="patch", batch_size=2, num_workers=0, val_fraction=0.34, split_path=None
    )
    patch = {"target_spacing": None, "size": PATCH, "num_samples": 3, **(patch or {})}
    return SegDataModule(**{**settings, **options}, patch=patch)


def filter_net(kernel: int) -> SegModule:
    """A network with a fixed answer: the local mean of the windowed intensities, thresholded at 0.5.

    Kernel 1 looks at one voxel; kernel 3 at its 3x3x3 neighbourhood, so it has a receptive field and zero
    padding at window borders, like any CNN.
    """
    net = {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 1,
        "kernel_size": kernel,
        "padding": kernel // 2,
    }
    module = SegModule(
        net=net, inference={"roi_size": PATCH, "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 2}
    )
    with torch.no_grad():
        module.net.weight.fill_(20.0 / kernel**3)
        module.net.bias.fill_(-10.0)  # logits = 20 * (mean - 0.5)
    return module


def validation_metrics(module: SegModule, datamodule: SegDataModule) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize(("kernel", "tolerance"), [(1, 1e-6), (3, 0.01)])
def test_sliding_window_dice_matches_one_full_volume_pass(
    tmp_path: Path, kernel: int, tolerance: float
) -> None:
    datamodule = patch_datamodule(make_dataset(tmp_path / "ds"))
    datamodule.setup()
    volume = datamodule.val_ds[0]["image"]
    assert all(s > p for s, p in zip(volume.shape[1:], PATCH, strict=True)), (
        "the volume must need several windows"
    )

    module = filter_net(kernel)
    windowed = validation_metrics(module, datamodule)
    module.hparams.inference["roi_size"] = None  # the same network over each whole volume at once
    whole = validation_metrics(module, datamodule)
    assert windowed["Dice/val"] > 0.8  # the filter finds the organ
    assert windowed["Dice/val"] == pytest.approx(whole["Dice/val"], abs=tolerance)
    assert windowed["HD95/val"] == pytest.approx(whole["HD95/val"], abs=max(tolerance, 1e-5) * 100)

    # The logits themselves: identical for the voxel-wise filter, close where windows cut the 3x3x3 one.
    module.hparams.inference["roi_size"] = PATCH
    with torch.no_grad():
        stitched = module.infer(volume[None])
        direct = module(volume[None])
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    if kernel == 1:
        torch.testing.assert_close(stitched, direct, atol=1e-4, rtol=1e-5)
    else:
        assert (stitched[inside] > 0).eq(direct[inside] > 0).float().mean() > 0.99


def test_stitching_on_the_cpu_is_an_option(tmp_path: Path) -> None:
    datamodule = patch_datamodule(make_dataset(tmp_path / "ds"))
    module = filter_net(1)
    module.hparams.inference.update(device="cpu", sw_device="cpu", mode="constant", overlap=0.25)
    metrics = validation_metrics(module, datamodule)
    assert metrics["Dice/val"] > 0.8
    volume = datamodule.val_ds[0]["image"][None]
    with torch.no_grad():
        assert module.infer(volume).device.type == "cpu"


def test_patch_mode_draws_several_patches_per_volume_around_foreground(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    datamodule = patch_datamodule(root, patch={"pos_neg_ratio": [1, 0]})
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    # batch_size 2 volumes x num_samples 3 patches each, every patch centred on the organ.
    assert batch["image"].shape == (6, 1, *PATCH) and batch["label"].shape == (6, 1, *PATCH)
    assert all(bool(patch.any()) for patch in batch["label"])
    # Only background centres: the centre voxel is never organ.
    datamodule = patch_datamodule(root, patch={"pos_neg_ratio": [0, 1]})
    datamodule.setup()
    labels = torch.cat([next(iter(datamodule.train_dataloader()))["label"] for _ in range(3)])
    assert not labels[:, 0, 8, 8, 8].any()
    # Validation sees whole volumes at their own spacing.
    val = next(iter(datamodule.val_dataloader()))
    assert val["image"].shape == (1, 1, *SHAPE)


def test_patch_mode_resamples_to_the_target_spacing(tmp_path: Path) -> None:
    datamodule = patch_datamodule(
        make_dataset(tmp_path / "ds"), patch={"target_spacing": [2.0, 2.0, 2.0], "size": [16, 16, 8]}
    )
    datamodule.setup()
    val = next(iter(datamodule.val_dataloader()))
    assert tuple(val["image"].shape[2:]) == (20, 18, 24)  # 40 x 36 x 24 at 1 x 1 x 2 mm -> 2 mm voxels
    affine = val["image"].affine[0]
    assert torch.linalg.norm(affine[:3, :3], dim=0).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert next(iter(datamodule.train_dataloader()))["image"].shape == (6, 1, 16, 16, 8)


def test_patches_by_label_class(tmp_path: Path) -> None:
    datamodule = patch_datamodule(
        make_dataset(tmp_path / "ds", two_labels=True), patch={"class_ratios": [0, 0, 1]}
    )
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert all(bool((patch == 2).any()) for patch in batch["label"])  # every patch centred on the cyst
    wrong = patch_datamodule(tmp_path / "ds", patch={"class_ratios": [1, 1]})
    with pytest.raises(
        ConfigError, match="data.patch.class_ratios has 2 entries but the dataset has 3 label classes"
    ):
        wrong.setup()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "tiles"}, "data.mode must be one of resize, patch"),
        ({"patch": {"size": [16, 16]}}, "data.patch.size must be three positive sizes"),
        ({"patch": {"num_samples": 0}}, "data.patch.num_samples must be at least 1"),
        ({"patch": {"pos_neg_ratio": [0, 0]}}, "data.patch.pos_neg_ratio must not be [0, 0]"),
        ({"patch": {"sizes": [16, 16, 16]}}, "data.patch.sizes: not a patch option"),
    ],
)
def test_bad_patch_options(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        patch_datamodule(tmp_path, **options)
    assert message in str(error.value)


def test_patch_larger_than_the_volume_is_one_clear_message(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    root = make_dataset(tmp_path / "ds")
    run = tmp_path / "run"
    status = train_in_process(
        [
            "data=msd",
            f"data.root={root}",
            "data.mode=patch",
            "data.patch.target_spacing=[2.0,2.0,2.0]",
            "data.patch.size=[32,32,32]",
            "data.num_workers=0",
            "model.init_filters=8",
        ],
        run,
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(
        "seglight.train: error: data.patch.size=[32, 32, 32] is larger"
    )
    assert "c0 ([20, 18, 24] voxels) and 2 more at data.patch.target_spacing=[2.0, 2.0, 2.0] mm" in err[0]
    assert "no larger than [20, 18, 24]" in err[0]
    assert not (run / "checkpoints").exists()
