"""Evaluation against hand-computed values, and `train ... test=true` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglight import compose
from seglight.core.errors import DataError
from seglight.evaluate import run
from seglight.evaluation.scoring import evaluate
from tests.helpers import run_script, tiny_overrides

SPACING = (1.0, 1.0, 2.0)  # a voxel is 2 mm^3 = 0.002 ml
SHAPE = (8, 8, 8)


def save(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.diag([*SPACING, 1.0])), path)


def mask(*boxes: tuple[slice, slice, slice], value: int = 1) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    for box in boxes:
        out[box] = value
    return out


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    cube = (slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
    # shifted: the same cube one voxel (2 mm) up in z: 48 voxels overlap.
    save(gt / "shifted.nii.gz", mask(cube))
    save(pred / "shifted.nii.gz", mask((slice(2, 6), slice(2, 6), slice(3, 7))))
    # apart: one voxel each, 3 voxels apart along z (6 mm).
    save(gt / "apart.nii.gz", mask((slice(5, 6), slice(5, 6), slice(5, 6))))
    save(pred / "apart.nii.gz", mask((slice(5, 6), slice(5, 6), slice(2, 3))))
    # perfect, with a second label (value 2) in both.
    perfect = mask(cube)
    perfect[0, 0, 0] = 2
    save(gt / "perfect.nii.gz", perfect)
    save(pred / "perfect.nii.gz", perfect)
    # empty prediction of a 64-voxel cube.
    save(gt / "empty.nii.gz", mask(cube))
    save(pred / "empty.nii.gz", mask())
    save(gt / "no_prediction.nii.gz", mask(cube))  # missing on the prediction side
    save(pred / "no_truth.nii.gz", mask(cube))  # missing on the ground-truth side
    return pred, gt


def test_metrics_match_hand_computed_values(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    result = evaluate(pred, gt, output=tmp_path / "report")
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "report" / "metrics.csv").open())}
    assert list(rows) == sorted(rows)
    assert result.labels == [1, 2]  # every value present, without a dataset.json to name them

    def value(case: str, column: str) -> float:
        return float(rows[case][column])

    # shifted: Dice 2*48/(64+64); the 16 voxels of each cube's far face are 1 voxel = 2 mm from the other
    # cube's surface and no surface voxel is farther, so more than 5% of the distances are 2 mm: HD95 = 2 mm.
    assert value("shifted", "dice_1") == pytest.approx(0.75)
    assert value("shifted", "hd95_mm_1") == pytest.approx(2.0)
    assert value("shifted", "pred_ml_1") == pytest.approx(64 * 0.002)
    assert value("shifted", "true_ml_1") == pytest.approx(64 * 0.002)
    # apart: no overlap; every distance is 3 voxels along z = 6 mm.
    assert value("apart", "dice_1") == 0.0
    assert value("apart", "hd95_mm_1") == pytest.approx(6.0)
    assert value("apart", "pred_ml_1") == pytest.approx(0.002)
    assert value("perfect", "dice_1") == 1.0 and value("perfect", "hd95_mm_1") == 0.0
    assert value("perfect", "dice_2") == 1.0 and value("perfect", "true_ml_2") == pytest.approx(0.002)
    # empty prediction: Dice 0, HD95 the volume's diagonal (8 x 8 x 16 mm), nothing predicted.
    assert value("empty", "dice_1") == 0.0
    assert value("empty", "hd95_mm_1") == pytest.approx(math.sqrt(8**2 + 8**2 + 16**2))
    assert value("empty", "pred_ml_1") == 0.0 and value("empty", "true_ml_1") == pytest.approx(0.128)
    # label 2 is in neither mask of "shifted": nothing to measure, left out of its mean.
    assert math.isnan(value("shifted", "dice_2")) and value("shifted", "pred_ml_2") == 0.0
    # missing cases are rows too, not silently dropped.
    assert rows["no_prediction"]["status"] == "missing prediction" and rows["no_prediction"]["dice_1"] == ""
    assert rows["no_truth"]["status"] == "missing ground truth"

    summary = json.loads((tmp_path / "report" / "metrics_summary.json").read_text())
    dice = summary["labels"]["1"]["dice"]
    scored = [0.75, 0.0, 1.0, 0.0]
    assert dice["n"] == 4 and dice["mean"] == pytest.approx(np.mean(scored))
    assert dice["std"] == pytest.approx(np.std(scored))
    assert summary["labels"]["2"]["dice"]["n"] == 1
    assert summary["missing prediction"] == ["no_prediction"] and summary["missing ground truth"] == [
        "no_truth"
    ]
    text = result.describe()
    assert "Dice 0.4375 ± 0.446 (n=4)" in text
    assert "missing prediction (1): no_prediction" in text and "missing ground truth (1): no_truth" in text


def test_cli_config_with_a_dataset_prints_mean_and_std_per_named_label(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, gt = folders
    dataset = tmp_path / "dataset"
    training = []
    for label in sorted(gt.glob("*.nii.gz")):
        (dataset / "labelsTr").mkdir(parents=True, exist_ok=True)
        (dataset / "labelsTr" / label.name).write_bytes(label.read_bytes())
        training.append({"image": f"imagesTr/{label.name}", "label": f"labelsTr/{label.name}"})
    labels = {"0": "background", "1": "organ"}
    (dataset / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    cfg = compose([f"pred={pred}", f"gt={dataset}"], config_name="evaluate", output_dir=tmp_path)
    result = run(cfg)
    printed = capsys.readouterr().out
    assert result.labels == [1]  # the dataset names one foreground label
    assert "1 (organ): Dice 0.4375 ± 0.446 (n=4)" in printed
    assert f"Per-case metrics: {pred / 'metrics.csv'}" in printed and (pred / "metrics.csv").is_file()


def test_mismatched_or_missing_inputs_are_reported(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    save(pred / "other_grid.nii.gz", np.zeros((4, 4, 4)))
    save(gt / "other_grid.nii.gz", np.zeros(SHAPE))
    (pred / "garbage.nii.gz").write_bytes(b"not nifti")
    save(gt / "garbage.nii.gz", mask())
    result = evaluate(pred, gt, output=tmp_path / "r")
    statuses = {r["case"]: r["status"] for r in result.problems}
    assert statuses["other_grid"] == "shape differs: prediction (4, 4, 4), ground truth (8, 8, 8)"
    assert "garbage.nii.gz: not a readable NIfTI image" in statuses["garbage"]
    with pytest.raises(DataError, match="pred=.*nowhere: no such folder"):
        evaluate(tmp_path / "nowhere", gt)
    (tmp_path / "elsewhere").mkdir()
    save(tmp_path / "elsewhere" / "unrelated.nii.gz", mask())
    with pytest.raises(DataError, match="no case in common"):
        evaluate(tmp_path / "elsewhere", gt)


@pytest.mark.slow
def test_train_with_test_true_predicts_and_scores_the_held_out_cases(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_script("seglight-train", *tiny_overrides(run_dir), "test=true", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    held_out = json.loads((run_dir / "split.json").read_text())["val"]
    rows = list(csv.DictReader((run_dir / "test" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == sorted(held_out) and all(r["status"] == "ok" for r in rows)
    assert all(0.0 <= float(r["dice_1"]) <= 1.0 and float(r["true_ml_1"]) > 0 for r in rows)
    demo = next(Path(cache_dir, "demo").glob("ct6_*"))
    for case in held_out:  # each prediction sits on its scan's voxel grid
        scan = nib.load(demo / "imagesTr" / f"{case}.nii.gz")
        written = nib.load(run_dir / "test" / "predictions" / f"{case}.nii.gz")
        assert written.shape == scan.shape and np.allclose(written.affine, scan.affine)
    assert "Test on held-out cases" in result.stdout + result.stderr
    # The pictures: progress.png at the end, the validation picture in TensorBoard.
    assert (run_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "Validation/overlay" in events.Tags()["images"]
    assert [e.step for e in events.Images("Validation/overlay")] == [0]  # first validation; every 5th after
