"""Prediction: masks in the input's exact geometry, safe checkpoint loading, per-case failures, the CLI.

The model under test is a real checkpoint of a real SegModule whose network is a 1x1x1 convolution with fixed
weights: its output is a fixed function of the (windowed) intensity, and the test images are bright exactly
where their label is. So after reorientation, resizing, inference and the inverse of all of it, the written
mask must equal the label voxel for voxel. Label blocks start and end on even voxels, so the 2x resizing
between the input shapes and the 16^3 training size is exact in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from omegaconf import OmegaConf

from seglight import SegModule, compose, predict_volume
from seglight.core.errors import ConfigError, DataError
from seglight.exporting.formats import export_checkpoint
from seglight.prediction.cases import predict
from seglight.prediction.inputs import list_inputs
from seglight.prediction.models import load_module, preprocessing
from seglight.prediction.predictor import Predictor
from seglight.training.checkpoints import safe_load
from tests.helpers import S3, block_label, intensity_checkpoint, run_script

SIZE = [16, 16, 16]
# Label value -> intensity (the window is -1000..1000, so 0, 0.5 and 1 after windowing).
BINARY_HU = {0: -1000.0, 1: 1000.0}
MULTICLASS_HU = {0: -1000.0, 1: 0.0, 2: 1000.0}


def oblique_affine() -> np.ndarray:
    """Rotated 20 degrees about z, axes permuted and flipped, anisotropic 0.7 x 1.3 x 2.5 mm, shifted."""
    t = np.deg2rad(20.0)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    permutation = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


GEOMETRIES = {
    "ras": ((32, 32, 16), np.diag([0.8, 0.8, 2.5, 1.0]) + np.array([[0, 0, 0, -12.0]] * 3 + [[0, 0, 0, 0]])),
    "lps": ((32, 32, 16), np.diag([-0.8, -0.8, 2.5, 1.0])),
    "oblique": ((32, 16, 32), oblique_affine()),
}


def write_case(folder: Path, name: str, shape, affine, values=(1, 1), hu=BINARY_HU) -> tuple[Path, Path]:
    label = block_label(shape, values)
    image = np.vectorize(hu.get)(label).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    image_path, label_path = folder / f"{name}.nii.gz", folder / "labels" / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return image_path, label_path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("scans")
    return {
        name: write_case(folder / "in", name, shape, affine) for name, (shape, affine) in GEOMETRIES.items()
    }


@pytest.fixture(scope="module")
def binary_ckpt(scans: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = [{"image": str(i), "label": str(lb)} for i, lb in scans.values()]
    return intensity_checkpoint(tmp_path_factory.mktemp("ckpt") / "binary.ckpt", cases, classes=1)


def test_masks_keep_shape_affine_and_line_up_voxel_for_voxel(
    scans: dict[str, tuple[Path, Path]], binary_ckpt: Path, tmp_path: Path
) -> None:
    report = predict(binary_ckpt, input=scans["ras"][0].parent, output=tmp_path / "out", device="cpu")
    assert sorted(report.written) == sorted(GEOMETRIES) and not report.failed
    for name, (image_path, label_path) in scans.items():
        scan, written = nib.load(image_path), nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert written.shape == scan.shape, name
        assert np.allclose(written.affine, scan.affine, atol=1e-6), name
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(scan.affine), name
        assert int(written.header["sform_code"]) == int(scan.header["sform_code"]), name
        assert written.get_data_dtype() == np.uint8
        mask = np.asanyarray(written.dataobj)
        label = np.asanyarray(nib.load(label_path).dataobj)
        assert label.sum() > 0 and np.array_equal(mask, label), (
            f"{name}: {(mask != label).sum()} voxels differ"
        )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.is_file()]
    with pytest.raises(ConfigError, match="ras.nii.gz would overwrite the input image"):
        predict(binary_ckpt, input=scans["ras"][0], output=scans["ras"][0].parent)


def test_flip_tta_and_smaller_windows_still_line_up(scans, binary_ckpt: Path, tmp_path: Path) -> None:
    predictor = Predictor(
        binary_ckpt, inference={"roi_size": [8, 8, 8], "overlap": 0.25}, tta=True, device="cpu"
    )
    assert predictor.inference["roi_size"] == [8, 8, 8] and predictor.tta
    image_path, label_path = scans["oblique"]
    result = predictor.predict_case(str(image_path), keep_probabilities=True)
    assert np.array_equal(result.mask, np.asanyarray(nib.load(label_path).dataobj))
    probabilities = result.probability_image()
    assert probabilities.shape == nib.load(image_path).shape and probabilities.get_data_dtype() == np.float32
    assert float(np.asanyarray(probabilities.dataobj).max()) <= 1.0


@pytest.mark.parametrize(
    ("normalize", "intensity", "steps", "value_range"),
    [
        ("zscore", None, {"zscore": {"subtrahend": None, "nonzero": False, "channel_wise": True}}, None),
        (
            "ct",
            {"low": [-1000.0], "high": [1000.0], "mean": [-1000.0], "std": [1000.0]},
            {
                "intensity": {
                    "a_min": -1000.0,
                    "a_max": 1000.0,
                    "b_min": -1000.0,
                    "b_max": 1000.0,
                    "clip": True,
                },
                "zscore": {"subtrahend": [-1000.0], "divisor": [1000.0], "channel_wise": True},
            },
            [0.0, 2.0],
        ),
    ],
)
def test_other_normalisations_are_replayed_by_prediction_and_described_by_the_export(
    normalize: str, intensity, steps: dict, value_range, scans, tmp_path: Path
) -> None:
    # The window (a_min..a_max) is far off every intensity: a prediction that fell back to it would find nothing.
    cases = [{"image": str(i), "label": str(lb)} for i, lb in scans.values()]
    data = {"normalize": normalize, "intensity": intensity, "a_min": 2000.0, "a_max": 3000.0}
    ckpt = intensity_checkpoint(tmp_path / f"{normalize}.ckpt", cases, classes=1, **data)
    saved = load_module(ckpt).hparams.data
    assert (saved["normalize"], saved["intensity"]) == (normalize, intensity)
    report = predict(ckpt, input=scans["ras"][0].parent, output=tmp_path / "out", device="cpu")
    assert sorted(report.written) == sorted(GEOMETRIES) and not report.failed
    for name, (image_path, label_path) in scans.items():
        scan, written = nib.load(image_path), nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert written.shape == scan.shape and np.allclose(written.affine, scan.affine, atol=1e-6), name
        label = np.asanyarray(nib.load(label_path).dataobj)
        assert np.array_equal(np.asanyarray(written.dataobj), label), name

    # The export JSON describes the normalisation from the transform objects, and rebuilds it with MONAI alone.
    meta = export_checkpoint(ckpt, "torchscript", output=tmp_path / "deploy").metadata
    described = {step["step"]: step for step in meta["preprocessing"]["steps"]}
    for step, settings in steps.items():
        assert {k: described[step][k] for k in settings} == settings, step
    assert meta["input"]["value_range"] == value_range and meta["data_settings"]["normalize"] == normalize
    rebuilt = mt.Compose([eval(step["monai"], vars(mt)) for step in meta["preprocessing"]["steps"]])  # noqa: S307
    image = {"image": str(scans["oblique"][0])}
    expected = mt.Compose(preprocessing(saved))(image)["image"]
    assert torch.equal(rebuilt(image)["image"].as_tensor(), expected.as_tensor())


def test_multiclass_writes_the_dataset_label_values_and_probabilities(tmp_path: Path) -> None:
    shape, affine = GEOMETRIES["lps"]
    image_path, label_path = write_case(tmp_path / "in", "mc", shape, affine, (1, 2), MULTICLASS_HU)
    other = write_case(tmp_path / "in2", "mc2", *GEOMETRIES["ras"], (2, 1), MULTICLASS_HU)
    cases = [{"image": str(p[0]), "label": str(p[1])} for p in ((image_path, label_path), other)]
    ckpt = intensity_checkpoint(tmp_path / "mc.ckpt", cases, classes=3)
    report = predict(ckpt, input=image_path, output=tmp_path / "out", save_probabilities=True, device="cpu")
    assert list(report.written) == ["mc"]
    mask = np.asanyarray(nib.load(tmp_path / "out" / "mc.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1, 2}
    assert np.array_equal(mask, np.asanyarray(nib.load(label_path).dataobj))
    probs = nib.load(tmp_path / "out" / "probabilities" / "mc.nii.gz")
    assert probs.shape == (*shape, 3) and np.allclose(probs.affine, affine)
    assert np.allclose(np.asanyarray(probs.dataobj).sum(-1), 1.0, atol=1e-4)


def test_crafted_checkpoint_is_refused_without_running_its_code(
    scans, tmp_path: Path, cache_dir: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    crafted = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": Exploit()}}, crafted)
    cfg = compose(
        [f"ckpt={crafted}", f"input={scans['ras'][0]}", f"output={tmp_path / 'out'}"],
        config_name="predict",
        output_dir=tmp_path,
    )
    from seglight.predict import run

    with pytest.raises(
        ConfigError,
        match=r"evil.ckpt: refused: loading it would run code from the file \(it references exec\).*weights_only=True",
    ):
        run(cfg)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))
    torch.load(crafted, weights_only=False)  # what an unsafe loader would have done
    assert marker.read_text() == "ran"


def test_benign_omegaconf_hyperparameters_still_load(binary_ckpt: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(binary_ckpt, weights_only=False)
    checkpoint["datamodule_hyper_parameters"] = OmegaConf.create(checkpoint["datamodule_hyper_parameters"])
    del checkpoint["hyper_parameters"]["data"]  # as older versions saved it: beside the module only
    torch.save(checkpoint, tmp_path / "omegaconf.ckpt")
    module = load_module(tmp_path / "omegaconf.ckpt")
    assert module.hparams.data["spatial_size"] == SIZE and not module.training
    for path, problem in (
        (tmp_path / "missing.ckpt", "no such checkpoint file"),
        (Path(__file__), "not a readable PyTorch checkpoint"),
    ):
        with pytest.raises(ConfigError, match=problem):
            safe_load(path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "bare.ckpt")
    with pytest.raises(ConfigError, match="bare.ckpt: not a Lightning checkpoint"):
        safe_load(tmp_path / "bare.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="not a seglight checkpoint"):
        load_module(tmp_path / "plain.ckpt")


def test_inputs_from_files_folders_and_datalists(scans, tmp_path: Path) -> None:
    folder = scans["ras"][0].parent
    assert [c.case_id for c in list_inputs(folder)] == sorted(GEOMETRIES)
    assert [c.case_id for c in list_inputs(scans["lps"][0])] == ["lps"]
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {"training": [{"image": str(scans["ras"][0]), "label": "x"}], "test": [str(scans["lps"][0])]}
        )
    )
    assert [c.case_id for c in list_inputs(tmp_path)] == ["lps"]  # a dataset folder: its test list
    assert [c.case_id for c in list_inputs(tmp_path / "dataset.json", datalist_key="training")] == ["ras"]
    (tmp_path / "list.csv").write_text(f"img,other\n{scans['oblique'][0]},1\n")
    assert [c.image for c in list_inputs(tmp_path / "list.csv", {"image_key": "img"})] == [
        str(scans["oblique"][0])
    ]
    with pytest.raises(DataError, match="no such file or folder"):
        list_inputs(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .nii"):
        list_inputs(tmp_path / "empty")
    (tmp_path / "dupes.json").write_text(json.dumps([str(scans["ras"][0]), str(scans["ras"][0])]))
    with pytest.raises(DataError, match="entries 0 and 1 both have the image .*ras.nii.gz"):
        list_inputs(tmp_path / "dupes.json")


def test_predict_volume_in_a_notebook(scans, binary_ckpt: Path) -> None:
    module = SegModule.load_from_checkpoint(binary_ckpt, map_location="cpu")
    image_path, label_path = scans["lps"]
    label = np.asanyarray(nib.load(label_path).dataobj)
    module.train()
    mask = predict_volume(module, str(image_path))  # the module carries the preprocessing it was trained with
    assert np.allclose(mask.affine, nib.load(image_path).affine)
    assert np.array_equal(np.asanyarray(mask.dataobj), label)
    assert module.training  # left as it was
    assert np.array_equal(np.asanyarray(predict_volume(binary_ckpt, image_path).dataobj), label)
    by_hand = SegModule(
        net={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 1, "kernel_size": 1}
    )
    with pytest.raises(ConfigError, match="pass data="):
        predict_volume(by_hand, str(image_path))
    assert predict_volume(by_hand, str(image_path), data=binary_ckpt).shape == nib.load(image_path).shape


@pytest.mark.slow
def test_cli_writes_the_good_inputs_and_names_the_bad_one(
    scans, binary_ckpt: Path, tmp_path: Path, cache_dir: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("ras", "lps"):
        (folder / f"{name}.nii.gz").write_bytes(scans[name][0].read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "masks"
    result = run_script(
        "seglight-predict", f"ckpt={binary_ckpt}", f"input={folder}", f"output={out}", cache=cache_dir
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"seglight.predict: error: 1 of 3 input(s) could not be predicted:\n  {folder / 'broken.nii.gz'}"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr
    log = result.stdout + result.stderr + (out / "predict.log").read_text()
    assert "[2/3] lps" in log and "[3/3] ras" in log
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["lps.nii.gz", "ras.nii.gz"]
    for name in ("ras", "lps"):
        assert np.array_equal(
            np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj),
            np.asanyarray(nib.load(scans[name][1]).dataobj),
        )
    assert (out / ".hydra" / "config.yaml").is_file()  # the options that made these masks


def test_inputs_under_an_s3_prefix(s3: S3, scans, binary_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    folder.mkdir()
    for name in ("lps", "oblique"):
        (folder / f"{name}.nii.gz").write_bytes(scans[name][0].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    url = s3.upload(folder, "scans", "batch1")
    report = predict(
        binary_ckpt, input=url, output=tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu"
    )
    assert sorted(report.written) == ["lps", "oblique"] and not report.failed
    for name in ("lps", "oblique"):
        written = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert np.allclose(written.affine, nib.load(scans[name][0]).affine)
        assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(nib.load(scans[name][1]).dataobj))
    with pytest.raises(DataError, match="no such object or prefix"):
        predict(binary_ckpt, input=f"{url}/missing", output=tmp_path / "none", cache_dir=tmp_path / "cache")
