"""MONAI bundles: ``seglight.export format=bundle`` writes a folder that ``python -m monai.bundle run`` runs in a
Python that cannot import seglight, segmenting scans into the masks ``seglight.predict`` writes; its metadata passes
``verify_metadata`` (against the schema seglight keeps) and its network ``verify_net_in_out``.

The checkpoints are real one-epoch runs: a binary SegResNet in resize mode (one pass, sigmoid, threshold) and a
three-label DynUNet in patch mode (resampling, sliding windows, softmax, argmax).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from seglight.core.errors import ConfigError, SeglightError
from seglight.data.normalization import normalization_transforms
from seglight.data.transforms import describe_steps
from seglight.exporting.bundle import SCHEMA_FILE, bundle_value, export_bundle, transform_config
from seglight.prediction.cases import predict
from seglight.prediction.models import preprocessing
from tests.helpers import run_cli, run_command, tiny_checkpoint

PATCH = [
    "experiment=patch",
    "data.demo.num_labels=2",
    "data.patch.size=[16,16,8]",
    "data.patch.target_spacing=[1.2,1.2,1.5]",
    "model.filters=[8,16,32]",
]


@pytest.fixture(scope="module")
def binary_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("binary"))


@pytest.fixture(scope="module")
def patch_ckpt(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("patch"), *PATCH)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three scans of different sizes and geometries: axis-aligned, oblique, and one with a header-only name."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    oblique = np.array([[0.0, -0.9, 0.1, 10.0], [1.1, 0.0, 0.0, -5.0], [0.0, 0.1, 2.4, 3.0], [0, 0, 0, 1]])
    geometries = {
        "case_a": ((24, 22, 14), np.diag([1.0, 1.2, 2.0, 1.0])),
        "case_b": ((20, 26, 12), oblique),
        "scan.v2": ((18, 18, 10), np.diag([-0.8, 0.8, 2.5, 1.0])),
    }
    for name, (shape, affine) in geometries.items():
        image = rng.normal(-200.0, 50.0, size=shape).astype(np.float32)
        image[4:12, 5:13, 3:9] += 400.0
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    return folder


@pytest.fixture
def without_seglight(tmp_path: Path, monkeypatch) -> None:
    """Subprocesses run in a Python where ``import seglight`` fails, as on a machine with only MONAI."""
    blocker = tmp_path / "blocked" / "seglight"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('seglight is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker.parent))
    check = run_command([sys.executable, "-c", "import seglight"], cwd=tmp_path)  # not the checkout
    assert check.returncode != 0 and "seglight is not installed here" in check.stderr


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def compare(bundle_masks: Path, seglight_masks: Path, labels: list[int]) -> dict[str, dict[int, float]]:
    """Dice per case and label between the two folders' masks, after checking they hold the same files and grids."""
    names = sorted(p.name for p in seglight_masks.glob("*.nii.gz"))
    assert sorted(p.name for p in bundle_masks.glob("*.nii.gz")) == names
    figures = {}
    for name in names:
        ours, theirs = nib.load(seglight_masks / name), nib.load(bundle_masks / name)
        assert theirs.shape == ours.shape and np.allclose(theirs.affine, ours.affine, atol=1e-5)
        a, b = np.asarray(theirs.dataobj), np.asarray(ours.dataobj)
        assert a.dtype == b.dtype == np.uint8
        figures[name] = {label: dice(a == label, b == label) for label in labels}
        differing = float((a != b).mean())
        assert differing <= 1e-3, (
            f"{name}: {differing:.2%} of the voxels differ"
        )  # interpolation ties at most
    return figures


@pytest.mark.parametrize("kind", ["binary", "patch"])
def test_the_bundle_segments_as_seglight_predict(
    kind: str, request, scans: Path, tmp_path: Path, without_seglight: None
) -> None:
    ckpt: Path = request.getfixturevalue(f"{kind}_ckpt")
    bundle = tmp_path / "bundle"
    if kind == "binary":  # through the command line once
        result = run_cli("seglight.export", f"ckpt={ckpt}", "format=bundle", f"output={bundle}")
        assert result.returncode == 0, result.stderr
        assert f"Wrote the MONAI bundle {bundle}" in result.stdout
    else:
        export_bundle(ckpt, bundle)
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json",
        "configs/logging.conf",
        "configs/metadata.json",
        "docs/README.md",
        "models/model.pt",
    ]
    config = (bundle / "configs" / "inference.json").read_text()
    assert "seglight" not in config  # nothing for MONAI to import from seglight
    assert isinstance(torch.load(bundle / "models" / "model.pt", weights_only=True), dict)

    predict(ckpt, scans, tmp_path / "seglight", device="cpu")
    ran = run_command(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
        + ["--dataset_dir", str(scans), "--output_dir", str(tmp_path / "bundle_masks")],
        cwd=bundle,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]

    labels = [1] if kind == "binary" else [1, 2]
    figures = compare(tmp_path / "bundle_masks", tmp_path / "seglight", labels)
    print(f"\n{kind}: Dice of the bundle's masks against seglight.predict's: {json.dumps(figures)}")
    assert all(value >= 0.999 for case in figures.values() for value in case.values())
    assert any(np.asarray(nib.load(p).dataobj).any() for p in (tmp_path / "seglight").glob("*.nii.gz"))

    verified = run_command(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json"]
        + ["--filepath", str(SCHEMA_FILE)],
        cwd=bundle,
    )
    assert (
        verified.returncode == 0 and "metadata is verified with no error" in verified.stdout + verified.stderr
    )
    shapes = run_command(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
        + ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
        cwd=bundle,
    )
    assert shapes.returncode == 0, shapes.stderr[-3000:]
    assert "data shape of network is verified with no error" in shapes.stdout + shapes.stderr


def test_the_metadata_describes_the_network_and_labels(patch_ckpt: Path, tmp_path: Path) -> None:
    result = export_bundle(patch_ckpt, tmp_path / "bundle", inference={"overlap": 0.25})

    metadata = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert metadata == result.metadata
    assert metadata["schema"].endswith("/meta_schema_20240725.json")
    network = metadata["network_data_format"]
    assert network["inputs"]["image"]["num_channels"] == 1
    assert (
        network["inputs"]["image"]["spatial_shape"] == [16, 16, 8]
        and network["inputs"]["image"]["is_patch_data"]
    )
    assert network["outputs"]["pred"]["num_channels"] == 3
    assert network["post_processed_outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "organ",
        "2": "cyst",
    }
    assert any("nnU-Net" in reference for reference in metadata["references"])
    # seglight.predict's inference options apply to the bundle too.
    inferer = result.inference["inferer"]
    assert inferer["_target_"] == "SlidingWindowInferer" and inferer["overlap"] == 0.25
    assert inferer["roi_size"] == [16, 16, 8]
    readme = (tmp_path / "bundle" / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run --config_file configs/inference.json" in readme


def test_a_new_export_replaces_a_bundle_and_refuses_other_folders(binary_ckpt: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    export_bundle(binary_ckpt, bundle)
    (bundle / "docs" / "stale.txt").write_text("from before")
    export_bundle(binary_ckpt, bundle)
    assert not (bundle / "docs" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial folder left beside it

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="a folder that holds other files"):
        export_bundle(binary_ckpt, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"

    default = export_bundle(binary_ckpt).folder
    assert default == binary_ckpt.parent.parent / "export" / "last_bundle"


def test_a_transform_seglight_cannot_describe_stops_the_export() -> None:
    with pytest.raises(SeglightError, match="cannot describe its RandFlipd transform"):
        transform_config(mt.RandFlipd(keys="image", prob=0.5))


@pytest.mark.parametrize(
    "settings", [{"spatial_size": [16, 16, 8]}, {"mode": "patch", "target_spacing": [1.2, 1.2, 1.5]}]
)
def test_bundle_entries_are_the_export_json_steps_in_the_bundle_syntax(settings: dict) -> None:
    """One describer: each bundle entry is the MONAI call the export JSON names for that step, with the same
    arguments, dtypes written as the expressions that make them."""
    pipeline = preprocessing(settings)
    for step, transform in zip(describe_steps(pipeline), pipeline, strict=True):
        entry = transform_config(transform)
        assert step["monai"].startswith(f"{entry.pop('_target_')}(keys={entry.pop('keys')!r}")
        described = {k: v for k, v in step.items() if k not in ("step", "what", "monai")}
        assert entry == {k: bundle_value(k, v) for k, v in described.items()}
    load = transform_config(pipeline[0])
    assert (
        load["_target_"] == "LoadImaged" and load["image_only"] is True
    )  # what seglight's loader was made with
    assert transform_config(pipeline[-1])["dtype"] == "$numpy.float32"


@pytest.mark.parametrize(
    ("normalize", "intensity", "expected"),
    [
        ("zscore_nonzero", None, {"_target_": "NormalizeIntensityd", "nonzero": True, "subtrahend": None}),
        (
            "ct",
            {"low": [-300.0], "high": [500.0], "mean": [40.0], "std": [120.0]},
            {
                "_target_": "NormalizeIntensityd",
                "subtrahend": [40.0],
                "divisor": [120.0],
                "channel_wise": True,
            },
        ),
    ],
)
def test_a_planned_normalisation_goes_into_the_bundle(
    normalize: str, intensity, expected: dict, binary_ckpt: Path, tmp_path: Path
) -> None:
    # The checkpoint as a run with data.normalize (what a plan sets) writes it; the export checks the bundle's
    # preprocessing against seglight's on a test scan before it writes anything.
    checkpoint = torch.load(binary_ckpt, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["data"].update(normalize=normalize, intensity=intensity)
    ckpt = tmp_path / f"{normalize}.ckpt"
    torch.save(checkpoint, ckpt)
    result = export_bundle(ckpt, tmp_path / "bundle")
    steps = result.inference["preprocessing"]["transforms"]
    (step,) = [s for s in steps if s["_target_"] == "NormalizeIntensityd"]
    assert {k: step[k] for k in expected} == expected
    if normalize == "ct":  # the clip: MONAI's ScaleIntensityRanged from low..high onto itself
        (clip,) = [s for s in steps if s["_target_"] == "ScaleIntensityRanged"]
        assert [clip[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip")] == [
            -300.0,
            500.0,
            -300.0,
            500.0,
            True,
        ]
        assert result.metadata["network_data_format"]["inputs"]["image"]["value_range"] == [
            -2.833333,
            3.833333,
        ]
    else:
        assert result.metadata["network_data_format"]["inputs"]["image"]["value_range"] == []
    assert "z-scored" in result.metadata["description"]


def test_a_normalisation_only_seglight_can_run_stops_the_bundle() -> None:
    per_channel = normalization_transforms(
        "image", ["ct", "zscore"], {"low": [0, None], "high": [1, None], "mean": [0, None], "std": [1, None]}
    )
    different = normalization_transforms(
        "image", "ct", {"low": [0, 5], "high": [1, 9], "mean": [0, 0], "std": [1, 1]}
    )
    for transform in (per_channel[0], different[0]):
        with pytest.raises(
            SeglightError,
            match=f"format=bundle: data.normalize needs seglight's own {type(transform).__name__}",
        ):
            transform_config(transform)
