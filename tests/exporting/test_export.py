"""Export for deployment: TorchScript and ONNX models that reproduce the checkpoint, with the JSON beside them.

The checkpoints are real: a one-epoch tiny SegResNet run (binary, sigmoid) and its multi-class twin (softmax),
trained in-process on the demo data as ``python -m seglight.train`` trains them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hydra import compose, initialize_config_module
from monai import transforms as mt

from seglight.core.errors import reported_errors
from seglight.data.caching.datasets import pipeline_signature
from seglight.data.transforms import describe_steps
from seglight.export import run
from seglight.exporting.formats import METADATA_NAME, export_checkpoint, load_trained
from seglight.prediction.models import load_module, preprocessing
from tests.helpers import tiny_overrides, train_in_process, write_nifti

SIZE = [16, 16, 8]  # SegResNet's deepest feature map is 2x2x1 voxels at this size


def trained_checkpoint(run_dir: Path, *overrides: str) -> Path:
    """A one-epoch tiny run's checkpoint (init_filters=8), as training writes it."""
    size = f"data.spatial_size=[{','.join(map(str, SIZE))}]"
    status = train_in_process([*tiny_overrides(run_dir), size, "trainer.max_epochs=1", *overrides], run_dir)
    assert status == 0
    (written,) = (run_dir / "checkpoints").glob("*.ckpt")
    return written.rename(run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def binary_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("binary"))


@pytest.fixture(scope="module")
def multiclass_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("multiclass"), "experiment=multiclass")


_LOADED: dict[Path, torch.nn.Module] = {}


def checkpoint_logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    """What the checkpoint's module computes for ``x`` (loaded as predict loads it)."""
    if ckpt not in _LOADED:
        _LOADED[ckpt] = load_trained(ckpt)[0]
    with torch.no_grad():
        return _LOADED[ckpt](x)


def volume(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_torchscript_gives_the_checkpoints_logits_exactly(binary_ckpt: Path, tmp_path: Path) -> None:
    result = export_checkpoint(binary_ckpt, "torchscript", output=tmp_path / "deploy")
    assert result.model_path == tmp_path / "deploy" / "last.pt"
    assert result.metadata_path == tmp_path / "deploy" / "last.pt.json"
    extra = {METADATA_NAME: ""}
    model = torch.jit.load(str(result.model_path), map_location="cpu", _extra_files=extra).eval()
    # Any batch size, and any size that is a multiple of SegResNet's 8, not only the trained 16^3.
    for x in (volume(2, 1, *SIZE), volume(3, 1, 24, 16, 32, seed=2)):
        with torch.no_grad():
            assert torch.equal(model(x), checkpoint_logits(binary_ckpt, x))

    meta = json.loads(result.metadata_path.read_text())
    assert json.loads(extra[METADATA_NAME]) == meta  # the model file carries its own description
    assert meta["format"] == "torchscript" and meta["model_file"] == "last.pt"
    assert meta["input"]["shape"] == ["batch", 1, "x", "y", "z"] and meta["input"]["dtype"] == "float32"
    assert meta["input"]["batch"] == "any"
    assert meta["input"]["spatial"] == {"dynamic": True, "multiple_of": [8, 8, 8], "trained_size": SIZE}
    assert meta["output"]["shape"] == ["batch", 1, "x", "y", "z"]
    assert meta["activation"]["type"] == "sigmoid" and meta["activation"]["threshold"] == 0.5
    assert meta["labels"] == {"0": "background", "1": "organ"}
    steps = {step["step"]: step for step in meta["preprocessing"]["steps"]}
    assert steps["orient"]["axcodes"] == "RAS"
    assert steps["resize"]["spatial_size"] == SIZE
    assert (steps["intensity"]["a_min"], steps["intensity"]["a_max"]) == (-1000.0, 1000.0)
    assert meta["preprocessing"]["inference"]["type"] == "whole volume"
    assert meta["data_settings"]["mode"] == "resize" and "patch_size" not in meta["data_settings"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(binary_ckpt.read_bytes()).hexdigest()
    assert meta["checkpoint"]["path"] == str(binary_ckpt.resolve()) and meta["checkpoint"]["epoch"] == 0
    checks = meta["verification"]["checks"]
    assert all(c["passed"] and c["max_abs_difference"] == 0.0 for c in checks.values())
    written = sorted(p.name for p in (tmp_path / "deploy").iterdir())
    assert written == ["last.pt", "last.pt.json"]  # and no temporaries


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript-exporter"])
def test_onnx_gives_the_checkpoints_logits_within_1e4(
    multiclass_ckpt: Path, tmp_path: Path, dynamo: bool
) -> None:
    result = export_checkpoint(multiclass_ckpt, "onnx", output=tmp_path / "model.onnx", dynamo=dynamo)
    assert (
        result.model_path == tmp_path / "model.onnx" and result.metadata_path == tmp_path / "model.onnx.json"
    )
    onnx.checker.check_model(str(result.model_path))
    session = onnxruntime.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "image" and graph_input.shape[1] == 1
    assert not isinstance(graph_input.shape[0], int)  # a dynamic batch
    for x in (volume(2, 1, *SIZE), volume(1, 1, 24, 32, 16, seed=2)):
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        expected = checkpoint_logits(multiclass_ckpt, x)
        assert logits.shape == tuple(expected.shape) == (x.shape[0], 3, *x.shape[2:])
        assert float((torch.from_numpy(logits) - expected).abs().max()) <= 1e-4

    meta = json.loads(result.metadata_path.read_text())
    assert json.loads(session.get_modelmeta().custom_metadata_map[METADATA_NAME]) == meta
    assert meta["format"] == "onnx" and meta["onnx_opset"] == 18
    assert meta["activation"]["type"] == "softmax"
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "cyst"}
    assert meta["output"]["shape"] == ["batch", 3, "x", "y", "z"]
    assert meta["input"]["batch"] == "any" and meta["input"]["spatial"]["dynamic"] is True
    assert {"onnx", "onnxruntime"} <= set(meta["versions"])


def test_command_line_exports_the_plain_network_beside_the_run(binary_ckpt: Path, tmp_path: Path) -> None:
    # The checkpoint as a run with every memory and speed switch on writes it: the same weights.
    checkpoint = torch.load(binary_ckpt, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["compute"].update(compile=True, channels_last=True, checkpointing=True)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    torch.save(checkpoint, ckpt)
    script = Path(sys.executable).with_name("seglight-export")
    result = subprocess.run(
        [str(script), f"ckpt={ckpt}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = run_dir / "export" / "best.pt"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["best.pt", "best.pt.json"]
    assert str(exported) in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no log file or Hydra folder left behind
    model = torch.jit.load(str(exported), map_location="cpu").eval()
    x = volume(2, 1, *SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), checkpoint_logits(binary_ckpt, x))
    meta = json.loads((run_dir / "export" / "best.pt.json").read_text())
    assert meta["checkpoint"]["path"] == str(ckpt)
    assert not {"compile", "channels_last", "checkpointing"} & set(meta["network"])


def rebuilt(steps: list[dict]) -> mt.Compose:
    """The pipeline a deployment builds from the JSON's steps with MONAI alone: each step's ``monai`` call."""
    return mt.Compose([eval(step["monai"], vars(mt)) for step in steps])  # noqa: S307 - the test's own JSON


def test_the_json_rebuilds_the_preprocessing_and_follows_its_settings(
    binary_ckpt: Path, tmp_path: Path
) -> None:
    # The checkpoint as a run with other preprocessing settings writes it.
    checkpoint = torch.load(binary_ckpt, map_location="cpu", weights_only=False)
    other = {"a_min": -200.0, "a_max": 300.0, "orientation": "LPS"}
    checkpoint["hyper_parameters"]["data"].update(other)
    checkpoint.get("datamodule_hyper_parameters", {}).update(other)
    ckpt = tmp_path / "other.ckpt"
    torch.save(checkpoint, ckpt)
    meta = export_checkpoint(ckpt, "torchscript", output=tmp_path / "deploy").metadata

    steps = {step["step"]: step for step in meta["preprocessing"]["steps"]}
    assert steps["orient"]["axcodes"] == "LPS" and "axcodes='LPS'" in steps["orient"]["monai"]
    assert (steps["intensity"]["a_min"], steps["intensity"]["a_max"]) == (-200.0, 300.0)
    assert steps["resize"]["spatial_size"] == SIZE and steps["resize"]["mode"] == "trilinear"
    assert meta["preprocessing"]["back_to_the_scan"].startswith("undo resize, then orient ")
    # What a deployment rebuilds from the JSON is what prediction runs, to the voxel and the affine.
    values = np.random.default_rng(0).uniform(-1000, 1000, (20, 18, 12)).astype(np.float32)
    scan = {"image": str(write_nifti(tmp_path / "scan.nii.gz", values))}
    expected = mt.Compose(preprocessing(load_module(ckpt).hparams.data))(scan)["image"]
    got = rebuilt(meta["preprocessing"]["steps"])(scan)["image"]
    assert torch.equal(got.as_tensor(), expected.as_tensor()) and torch.equal(got.affine, expected.affine)


def test_one_description_of_the_transforms_makes_the_cache_key_and_the_json() -> None:
    pipeline = preprocessing({"mode": "resize", "spatial_size": SIZE})
    at = next(i for i, t in enumerate(pipeline) if isinstance(t, mt.Resized))
    # A setting of the transform itself that no seglight option sets: both the cache key and the JSON see it.
    changed = [
        *pipeline[:at],
        mt.Resized(keys=["image"], spatial_size=SIZE, mode="area"),
        *pipeline[at + 1 :],
    ]
    before, after = describe_steps(pipeline)[at], describe_steps(changed)[at]
    assert (before["mode"], after["mode"]) == ("trilinear", "area")
    assert {key for key in before if before[key] != after[key]} == {"mode", "monai"}
    assert pipeline_signature(mt.Compose(pipeline)) != pipeline_signature(mt.Compose(changed))


def export_cli(overrides: list[str]) -> int:
    """What ``python -m seglight.export overrides`` does, in this process; returns the exit status."""
    with initialize_config_module(config_module="seglight.conf", version_base="1.3"):
        cfg = compose(config_name="export", overrides=overrides)
    try:
        with reported_errors("seglight.export"):
            run(cfg)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def foreign_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing", ["ckpt=", "no such checkpoint file"]),
        ("folder", ["a folder; give a checkpoint file: one of", "last.ckpt"]),
        ("foreign", ["weights.pt", "not a seglight checkpoint"]),
        ("format", ["format=tflite", "format=torchscript, format=onnx or format=bundle"]),
        ("suffix", ["output=", "onnx file name, but format=torchscript"]),
        ("no onnx", ["format=onnx needs onnxruntime", 'pip install "seglight[export]"']),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, needles: list[str], binary_ckpt: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    overrides = {
        "missing": [f"ckpt={tmp_path / 'nothing.ckpt'}", f"output={out}"],
        "folder": [f"ckpt={binary_ckpt.parent.parent}", f"output={out}"],
        "foreign": [f"ckpt={foreign_checkpoint(tmp_path)}", f"output={out}"],
        "format": [f"ckpt={binary_ckpt}", "format=tflite", f"output={out}"],
        "suffix": [f"ckpt={binary_ckpt}", f"output={out / 'model.onnx'}"],
        "no onnx": [f"ckpt={binary_ckpt}", "format=onnx", f"output={out}"],
    }[case]
    if case == "no onnx":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # how Python reports a package that is absent
    assert export_cli(overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglight.export: error: "), lines
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert not out.exists()
