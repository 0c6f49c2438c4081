"""Validation metrics against values worked out by hand: Dice of overlapping cubes, HD95 in mm with anisotropic
spacing, empty predictions and empty ground truth, and the spacing the pipeline's transforms leave behind."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from torch import nn

from seglight import SegModule
from seglight.core.geometry import spacing_from_affine
from seglight.data.demo import demo_affine
from seglight.data.transforms import deterministic_transforms
from seglight.models.metrics import HD95Metric, image_spacing, per_class_means
from tests.helpers import write_nifti

SHAPE = (16, 16, 12)
SPACING = (0.8, 0.8, 2.5)  # mm, anisotropic like the demo CT


class MaskAsLogits(nn.Module):
    """A stand-in network whose input *is* the prediction: a label map in, confident logits for it out."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.unused = nn.Parameter(torch.zeros(1))  # Lightning wants a parameter to optimise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_channels == 1:
            return (x * 2 - 1) * 20.0
        onehot = torch.cat([(x == c).float() for c in range(self.out_channels)], dim=1)
        return (onehot * 2 - 1) * 20.0


def volume(*boxes: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]) -> torch.Tensor:
    """A ``(1, 1, *SHAPE)`` label map with each box ``(x range, y range, z range, value)`` painted in."""
    v = torch.zeros(1, 1, *SHAPE)
    for (x0, x1), (y0, y1), (z0, z1), value in boxes:
        v[0, 0, x0:x1, y0:y1, z0:z1] = value
    return v


def validate(
    cases: list[tuple[torch.Tensor, torch.Tensor]], classes: int = 1, **module_args
) -> dict[str, float]:
    """Run the real validation loop over (prediction, ground truth) pairs; returns the logged metrics."""
    affine = torch.as_tensor(np.diag([*SPACING, 1.0]))
    samples = [
        {
            "image": MetaTensor(pred[0], affine=affine),
            "label": MetaTensor(gt[0], affine=affine),
            "case_id": f"c{i}",
        }
        for i, (pred, gt) in enumerate(cases)
    ]
    module = SegModule(
        net={
            "_target_": "tests.models.test_metrics.MaskAsLogits",
            "in_channels": 1,
            "out_channels": classes,
        },
        **module_args,
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, dataloaders=DataLoader(samples, batch_size=1), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_two_cubes_with_known_overlap_give_known_dice() -> None:
    # 8^3 cubes shifted by 2 voxels along x: overlap 6*8*8 = 384 of 512 each -> Dice = 2*384 / 1024 = 0.75.
    pred = volume(((4, 12), (4, 12), (2, 10), 1))
    gt = volume(((6, 14), (4, 12), (2, 10), 1))
    metrics = validate([(pred, gt)], label_names={0: "background", 1: "organ"})
    assert metrics["Dice/val"] == pytest.approx(0.75, abs=1e-6)
    assert metrics["Dice/val/organ"] == pytest.approx(0.75, abs=1e-6)


def test_multiclass_dice_per_label_and_mean() -> None:
    # organ: perfect (Dice 1); cyst: 4x4x4 predicted where the truth is 4x4x2 inside it -> 2*32/(64+32) = 2/3.
    gt = volume(((1, 7), (1, 7), (1, 7), 1), ((9, 13), (9, 13), (4, 6), 2))
    pred = volume(((1, 7), (1, 7), (1, 7), 1), ((9, 13), (9, 13), (3, 7), 2))
    names = {0: "background", 1: "organ", 2: "cyst"}
    metrics = validate([(pred, gt)], classes=3, label_names=names)
    assert metrics["Dice/val/organ"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["Dice/val/cyst"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["Dice/val"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-6)


def test_hd95_in_millimetres_with_anisotropic_spacing() -> None:
    # One-voxel-thick plates: every voxel is a surface voxel, and each predicted voxel lies exactly 2 slices
    # (2 * 2.5 mm = 5 mm) from its ground-truth twin, so every surface distance, hence HD95, is 5 mm.
    gt = volume(((4, 12), (4, 12), (4, 5), 1))
    pred_z = volume(((4, 12), (4, 12), (6, 7), 1))
    assert validate([(pred_z, gt)])["HD95/val"] == pytest.approx(5.0, abs=1e-5)
    # The same 2-voxel shift along x is 2 * 0.8 = 1.6 mm.
    gt_x = volume(((4, 5), (4, 12), (2, 10), 1))
    pred_x = volume(((6, 7), (4, 12), (2, 10), 1))
    assert validate([(pred_x, gt_x)])["HD95/val"] == pytest.approx(1.6, abs=1e-5)


def test_hd95_ignores_a_few_outlier_voxels_unlike_the_maximum() -> None:
    # The plate is found exactly, plus one stray voxel 10 slices (25 mm) away: 1 of 65 predicted surface
    # voxels is off, below the 5% that the 95th percentile disregards, so HD95 is 0 where plain HD is 25 mm.
    gt = volume(((4, 12), (4, 12), (0, 1), 1))
    pred = volume(((4, 12), (4, 12), (0, 1), 1), ((8, 9), (8, 9), (10, 11), 1))
    hd95 = HD95Metric()(pred, gt, spacing=[list(SPACING)])
    assert hd95.item() == pytest.approx(0.0, abs=1e-6)
    from monai.metrics import HausdorffDistanceMetric

    assert HausdorffDistanceMetric()(pred, gt, spacing=[list(SPACING)]).item() == pytest.approx(25.0)


def test_empty_prediction_or_ground_truth_never_gives_nan_or_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    diagonal = math.dist((0, 0, 0), (SHAPE[0] * SPACING[0], SHAPE[1] * SPACING[1], SHAPE[2] * SPACING[2]))
    cube = volume(((4, 12), (4, 12), (2, 10), 1))
    empty = volume()

    # Missed structure (empty prediction, organ present): Dice 0, HD95 the largest distance in the volume.
    missed = validate([(empty, cube)])
    assert missed["Dice/val"] == 0.0
    assert missed["HD95/val"] == pytest.approx(diagonal, rel=1e-5)

    # False alarm on a case without the organ: MONAI leaves Dice undefined there (NaN, skipped), and it is the
    # only case, so nothing is measurable: Dice/val is MONAI's 0, HD95 still penalises the false structure.
    false_alarm = validate([(cube, empty)])
    assert false_alarm["Dice/val"] == 0.0
    assert false_alarm["HD95/val"] == pytest.approx(diagonal, rel=1e-5)

    # Both empty: nothing to measure; HD95 is not logged (with a warning) rather than logged as NaN or 0.
    with caplog.at_level("WARNING", logger="seglight"):
        nothing = validate([(empty, empty)], label_names={0: "background", 1: "organ"})
    assert "HD95/val" not in nothing and "HD95/val/organ" not in nothing
    assert nothing["Dice/val"] == 0.0
    assert any("HD95/val not logged" in r.getMessage() for r in caplog.records)

    # Mixed: a perfect case and a both-empty case -> the empty one is skipped, not averaged in.
    mixed = validate([(cube, cube), (empty, empty)])
    assert mixed["Dice/val"] == pytest.approx(1.0) and mixed["HD95/val"] == pytest.approx(0.0)
    for metrics in (missed, false_alarm, nothing, mixed):
        assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_normalised_surface_dice_at_a_tolerance_in_mm() -> None:
    gt = volume(((4, 12), (4, 12), (4, 5), 1))
    pred = volume(((4, 12), (4, 12), (6, 7), 1))  # 5 mm apart
    assert validate([(pred, gt)], metrics={"surface_dice_tolerance": 6.0})["NSD/val"] == pytest.approx(1.0)
    assert validate([(pred, gt)], metrics={"surface_dice_tolerance": 4.0})["NSD/val"] == pytest.approx(0.0)
    assert "HD95/val" not in validate([(pred, gt)], metrics={"hd95": False})


def test_per_class_means_skip_nan_and_report_unmeasurable_classes() -> None:
    values = torch.tensor([[0.5, float("nan")], [1.0, float("nan")]])
    mean, per_class = per_class_means(values)
    assert mean == pytest.approx(0.75) and per_class[0] == pytest.approx(0.75) and per_class[1] is None
    assert per_class_means(torch.full((2, 1), float("nan"))) == (None, [None])


def test_spacing_follows_the_transforms(tmp_path: Path) -> None:
    # A real NIfTI stored LPS like a DICOM conversion (flipped x and y), 0.8 x 0.8 x 2.5 mm, 40 x 30 x 20.
    shape = (40, 30, 20)
    path = write_nifti(tmp_path / "ct.nii.gz", np.zeros(shape, np.float32), spacing=SPACING)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), demo_affine(SPACING, shape)), path)

    def spacing_after(**options) -> list[float]:
        data = {"image": str(path)}
        for t in deterministic_transforms(label_key=None, **options):
            data = t(data)
        return image_spacing(data["image"][None])[0]

    # Resize mode: 40 x 30 x 20 voxels -> 20 x 15 x 10 doubles every spacing.
    assert spacing_after(spatial_size=(20, 15, 10)) == pytest.approx([1.6, 1.6, 5.0])
    # Patch mode: resampled to the target spacing.
    assert spacing_after(mode="patch", target_spacing=(1.5, 1.5, 2.0)) == pytest.approx([1.5, 1.5, 2.0])
    assert spacing_after(mode="patch", target_spacing=None) == pytest.approx(list(SPACING))
    # A rotated affine still gives the voxel edge lengths.
    c, s = math.cos(0.3), math.sin(0.3)
    rotated = torch.tensor([[c * 2, -s * 3, 0, 0], [s * 2, c * 3, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]])
    assert spacing_from_affine(rotated).tolist() == pytest.approx([2.0, 3.0, 4.0])
