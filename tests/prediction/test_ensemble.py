"""Ensembles and post-processing as nnU-Net users expect: the mean of the models' probabilities in the scan's grid,
checkpoints found in run folders and fold sweeps, the largest connected component per label, and the plan that
evaluate writes and predict takes.

The models are real checkpoints of SegModules whose network is a 1x1x1 convolution with fixed weights, so each
one's probabilities are a known smooth function of the (windowed) intensity, and two such models differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from seglight import SegDataModule, SegModule
from seglight.core.errors import ConfigError
from seglight.evaluation.scoring import evaluate
from seglight.prediction.cases import predict
from seglight.prediction.models import load_module
from seglight.prediction.postprocessing import keep_largest_component
from seglight.training.checkpoints import best_checkpoint, model_checkpoints

SHAPE = (24, 20, 16)
AFFINE = np.diag([-0.9, -0.9, 2.0, 1.0])  # LPS: reoriented on the way in, back on the way out
BIG = (slice(4, 12), slice(4, 12), slice(4, 10))  # 384 voxels
SMALL = (slice(17, 20), slice(14, 17), slice(10, 13))  # 27 voxels, apart from the big one


def conv_checkpoint(path: Path, weight: float, bias: float, size: list[int], classes: int = 1) -> Path:
    """A Lightning checkpoint of a SegModule whose logits are ``weight * x + bias`` of the windowed image x."""
    data = SegDataModule(datalist=[{"image": "i.nii.gz", "label": "l.nii.gz"}], spatial_size=size)
    module = SegModule(
        net={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": classes, "kernel_size": 1},
        label_names={0: "background", 1: "organ"} if classes == 1 else {0: "background", 1: "a", 2: "b"},
        metrics={"hd95": False},
        data=data.prediction_settings(),  # as seglight.build saves it
    )
    with torch.no_grad():
        module.net.weight.fill_(weight)
        module.net.bias.fill_(bias)
    trainer = L.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def two_blobs() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[BIG] = 1
    mask[SMALL] = 1
    return mask


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    image = np.where(two_blobs() > 0, 1000.0, -1000.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "blobs.nii.gz")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        # Two models that disagree near the edges, and preprocess differently (resized to 16^3 and to 8^3).
        "a": conv_checkpoint(folder / "a.ckpt", 6.0, -2.0, [16, 16, 16]),
        "b": conv_checkpoint(folder / "b.ckpt", 3.0, -2.5, [8, 8, 8]),
        "multiclass": conv_checkpoint(folder / "mc.ckpt", 1.0, 0.0, [16, 16, 16], classes=3),
    }


def run(ckpt, scans: Path, out: Path, **options) -> tuple[np.ndarray, np.ndarray]:
    """(mask, probabilities) of the one scan predicted by ``ckpt`` (one or several models)."""
    report = predict(ckpt, input=scans, output=out, device="cpu", save_probabilities=True, **options)
    assert list(report.written) == ["blobs"] and not report.failed
    written = nib.load(out / "blobs.nii.gz")
    assert written.shape == SHAPE and np.allclose(written.affine, AFFINE)
    probabilities = np.asanyarray(nib.load(out / "probabilities" / "blobs.nii.gz").dataobj)
    return np.asanyarray(written.dataobj), probabilities


def test_an_ensemble_averages_the_probabilities_in_the_scans_grid(
    models, scans: Path, tmp_path: Path
) -> None:
    mask_a, prob_a = run(models["a"], scans, tmp_path / "a")
    mask_b, prob_b = run(models["b"], scans, tmp_path / "b")
    assert not np.allclose(prob_a, prob_b, atol=0.05)  # two different models
    mask, prob = run([models["a"], models["b"]], scans, tmp_path / "ab")
    np.testing.assert_allclose(prob, (prob_a + prob_b) / 2, atol=1e-5)
    assert np.array_equal(mask, (prob > 0.5).astype(np.uint8))

    # The same model twice is that model.
    twin = tmp_path / "twin.ckpt"
    shutil.copy(models["a"], twin)
    mask_twice, prob_twice = run([models["a"], twin], scans, tmp_path / "aa")
    assert np.array_equal(mask_twice, mask_a)
    np.testing.assert_allclose(prob_twice, prob_a, atol=1e-6)

    # The folds of a cross-validation, as a multirun folder: each run's best checkpoint.
    sweep = tmp_path / "multiruns" / "2024-01-01_00-00-00"
    for fold, name in ((0, "a"), (1, "b")):
        ckpt_dir = sweep / str(fold) / "checkpoints"
        ckpt_dir.mkdir(parents=True)
        shutil.copy(models[name], ckpt_dir / "best-epoch001-dice0.5000.ckpt")
        shutil.copy(models["multiclass"], ckpt_dir / "last.ckpt")  # not the best: left out
    (sweep / "multirun.yaml").write_text("{}")
    _, prob_folds = run(sweep, scans, tmp_path / "folds")
    np.testing.assert_allclose(prob_folds, prob, atol=1e-6)


def test_models_of_different_tasks_are_one_clear_error(models, scans: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"models disagree on out_channels: .*a.ckpt has 1, .*mc.ckpt has 3"
    ):
        predict([models["a"], models["multiclass"]], input=scans, output=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_run_folders_give_their_best_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("best-epoch003-dice0.7000.ckpt", "best-epoch009-dice0.8100.ckpt", "last.ckpt"):
        (run_dir / "checkpoints" / name).write_bytes(b"")
    assert best_checkpoint(run_dir).name == "best-epoch009-dice0.8100.ckpt"  # the highest Dice in the name
    (run_dir / "summary.json").write_text(
        json.dumps({"best_checkpoint": str(run_dir / "checkpoints" / "best-epoch003-dice0.7000.ckpt")})
    )
    assert model_checkpoints(str(run_dir))[0].name == "best-epoch003-dice0.7000.ckpt"  # the run's own record
    only_last = tmp_path / "interrupted"
    (only_last / "checkpoints").mkdir(parents=True)
    (only_last / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert model_checkpoints([str(run_dir), str(only_last)])[1].name == "last.ckpt"

    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints", sweep / "0" / "checkpoints")
    (sweep / "1" / ".hydra").mkdir(parents=True)  # a fold that failed before its first checkpoint
    with pytest.raises(ConfigError, match="the run 1 has no checkpoint"):
        model_checkpoints(str(sweep))
    with pytest.raises(ConfigError, match="no such checkpoint file or run folder"):
        model_checkpoints(str(tmp_path / "nowhere"))


def test_largest_component_per_label_on_a_hand_made_mask() -> None:
    mask = two_blobs()
    mask[0:3, 0:3, 0:3] = 2  # label 2: a 27-voxel blob
    mask[20:22, 0:2, 0:2] = 2  # and an 8-voxel one
    kept = keep_largest_component(mask, [1])
    assert int((kept == 1).sum()) == 384 and not kept[SMALL].any()  # label 1's small blob is background now
    assert np.array_equal(kept == 2, mask == 2)  # label 2 left alone
    both = keep_largest_component(mask, [1, 2])
    assert int((both == 2).sum()) == 27 and int((both == 1).sum()) == 384
    assert np.array_equal(keep_largest_component(mask, []), mask)


def test_evaluate_decides_the_post_processing_that_predict_applies(
    models, scans: Path, tmp_path: Path
) -> None:
    truth = tmp_path / "gt"
    truth.mkdir()
    only_big = np.zeros(SHAPE, dtype=np.uint8)
    only_big[BIG] = 1  # the small bright blob is not the organ: a false positive for the model
    nib.save(nib.Nifti1Image(only_big, AFFINE), truth / "blobs.nii.gz")
    mask, _ = run(models["a"], scans, tmp_path / "plain")
    assert mask[SMALL].any()  # the model finds both blobs

    result = evaluate(tmp_path / "plain", truth, output=tmp_path / "scores", determine_postprocessing=True)
    plan = json.loads((tmp_path / "scores" / "postprocessing.json").read_text())
    assert plan["largest_component"] == [1] and result.postprocessing_labels() == [1]
    dice = plan["mean_dice"]["1"]
    assert dice["dice_largest_component"] > dice["dice"] and dice["keep"] is True
    assert "largest component of 1 (label 1): Dice" in result.describe()

    cleaned, _ = run(models["a"], scans, tmp_path / "cleaned", largest_component=tmp_path / "scores")
    assert not cleaned[SMALL].any() and np.array_equal(cleaned[BIG], mask[BIG])
    same, _ = run(models["a"], scans, tmp_path / "every", largest_component=True)
    assert np.array_equal(same, cleaned)
    with pytest.raises(ConfigError, match=r"largest_component=\[3\]: the model has no label 3"):
        predict(models["a"], input=scans, output=tmp_path / "x", device="cpu", largest_component=[3])


def test_checkpoints_of_the_previous_layout_still_predict(models, scans: Path, tmp_path: Path) -> None:
    """Data settings only beside the module, with flat patch options."""
    checkpoint = torch.load(models["a"], weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    data = hparams.pop("data")
    checkpoint["datamodule_hyper_parameters"] = {
        **data,
        "patch_size": [96, 96, 96],
        "target_spacing": [1.5, 1.5, 2.0],
        "num_samples": 4,
    }
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = load_module(old)
    assert module.hparams.data == data
    mask_old, _ = run(old, scans, tmp_path / "old")
    mask_new, _ = run(models["a"], scans, tmp_path / "new")
    assert np.array_equal(mask_old, mask_new)
