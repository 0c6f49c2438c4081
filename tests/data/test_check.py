"""The dataset check: each fault on a small real file with exactly that fault, in-process and from the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight import SegDataModule
from seglight.core.errors import DataError
from tests.helpers import make_msd_dataset, run_cli, run_script, train_on, write_nifti


def datamodule(root: Path, tmp_path: Path, **kwargs) -> SegDataModule:
    defaults = dict(
        root=str(root),
        spatial_size=[16, 16, 8],
        num_workers=0,
        val_fraction=0.34,
        split_path=str(tmp_path / "run" / "split.json"),
        skipped_path=str(tmp_path / "run" / "skipped_cases.json"),
        cache_dir=str(tmp_path / "preprocessed"),
    )
    return SegDataModule(**{**defaults, **kwargs})


def set_meta(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


# Each fault: (make it in a 3-case dataset, the file it concerns, the words the message must hold, severity).
def missing_file(root: Path) -> Path:
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    return root / "labelsTr" / "case_1.nii.gz"


def not_nifti(root: Path) -> Path:
    bad = root / "imagesTr" / "case_2.nii.gz"
    bad.write_text("not an image\n")
    return bad


def truncated_gzip(root: Path) -> Path:
    bad = root / "imagesTr" / "case_0.nii.gz"
    bad.write_bytes(bad.read_bytes()[:-300])  # the header survives; the data stream ends early
    return bad


def corrupt_gzip(root: Path) -> Path:
    bad = root / "imagesTr" / "case_1.nii.gz"
    data = bytearray(bad.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zeroed bytes in the middle of the deflate stream
    bad.write_bytes(bytes(data))
    return bad


def shape_mismatch(root: Path) -> Path:
    return write_nifti(root / "labelsTr" / "case_1.nii.gz", np.zeros((20, 20, 10), np.uint8))


def affine_mismatch(root: Path) -> Path:
    label = np.asanyarray(nib.load(root / "labelsTr" / "case_2.nii.gz").dataobj)
    return write_nifti(root / "labelsTr" / "case_2.nii.gz", label, spacing=(1.0, 1.0, 3.0))


def two_d_image(root: Path) -> Path:
    path = root / "imagesTr" / "case_0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), path)
    return path


def wrong_channels(root: Path) -> Path:
    set_meta(root, modality={"0": "T1", "1": "T2"})  # declares 2 channels
    path = root / "imagesTr" / "case_0.nii.gz"
    for i in range(3):
        write_nifti(root / "imagesTr" / f"case_{i}.nii.gz", np.zeros((20, 20, 12, 2 if i else 3), np.float32))
    return path


def nan_values(root: Path) -> Path:
    path = root / "imagesTr" / "case_1.nii.gz"
    data = nib.load(path).get_fdata().astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    return write_nifti(path, data)


def undeclared_label(root: Path) -> Path:
    path = root / "labelsTr" / "case_2.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[0:2, 0:2, 0:2] = 3
    return write_nifti(path, data)


def fractional_label(root: Path) -> Path:
    path = root / "labelsTr" / "case_0.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    return write_nifti(path, data)


def all_background(root: Path) -> Path:
    return write_nifti(root / "labelsTr" / "case_1.nii.gz", np.zeros((20, 20, 12), np.uint8))


def odd_orientation(root: Path) -> Path:
    path = root / "imagesTr" / "case_2.nii.gz"
    for folder in ("imagesTr", "labelsTr"):
        p = root / folder / "case_2.nii.gz"
        img = nib.load(p)
        flipped = np.diag([-1.0, 1.0, 2.0, 1.0])  # x runs right-to-left: LAS instead of RAS
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), flipped), p)
    return path


FAULTS: list[tuple[Callable[[Path], Path], tuple[str, ...], str, bool]] = [
    (missing_file, ("file not found",), "error", False),
    (not_nifti, ("not a readable NIfTI image",), "error", False),
    (truncated_gzip, ("not a readable NIfTI image", "truncated or corrupt"), "error", True),
    (corrupt_gzip, ("not a readable NIfTI image", "truncated or corrupt"), "error", True),
    (shape_mismatch, ("shape 20×20×10 does not match the image",), "error", False),
    (affine_mismatch, ("affine differs",), "error", False),
    (two_d_image, ("2D image",), "error", False),
    (wrong_channels, ("has 3 channel(s) but the dataset declares 2",), "error", False),
    (nan_values, ("1 NaN and 1 infinite",), "error", True),
    (undeclared_label, ("label values 3 are not among the declared labels",), "error", True),
    (fractional_label, ("non-integer label values",), "error", True),
    (all_background, ("all background",), "warning", True),
    (odd_orientation, ("orientation LAS differs from most cases (RAS",), "warning", False),
]


@pytest.mark.parametrize(
    ("make_fault", "words", "severity", "needs_data"), FAULTS, ids=[f[0].__name__ for f in FAULTS]
)
def test_each_fault_is_found_with_its_file(
    make_fault, words: tuple[str, ...], severity: str, needs_data: bool, tmp_path: Path
) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad_file = make_fault(root)
    _, report = datamodule(root, tmp_path).inspect(full=True)
    found = [f for f in report.findings if f.severity == severity and all(w in f.message for w in words)]
    assert len(found) == 1, [str(f) for f in report.findings]
    assert found[0].path == str(bad_file)
    assert all(w in str(found[0]) and str(bad_file) in str(found[0]) for w in words)
    # Nothing else is wrong with the dataset.
    others = [f for f in report.errors if f is not found[0]]
    assert not others, [str(f) for f in others]
    # The header-only check that training runs first finds the header faults, and only those.
    _, fast = datamodule(root, tmp_path).inspect(full=False)
    fast_found = [f for f in fast.findings if all(w in f.message for w in words)]
    assert bool(fast_found) == (not needs_data)


def test_clean_dataset_summary(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    _, report = datamodule(root, tmp_path).inspect(full=True)
    assert not report.findings
    table = report.summary()
    for words in ("3 cases", "shape (voxels)", "20×20×12", "spacing (mm)", "1×1×2", "intensity ch0 p50"):
        assert words in table, table
    assert "label 1 (cube) voxels" in table and "384" in table  # 8*8*6 labelled voxels per case
    assert "orientation: RAS (3 cases)" in table


def test_training_refuses_a_bad_case_with_the_check_message(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    bad = shape_mismatch(root)
    with pytest.raises(DataError, match="does not match the image") as err:
        datamodule(root, tmp_path).setup("fit")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "run" / "split.json").exists(), "refused before splitting"


def test_skip_leaves_bad_cases_out_and_lists_them(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=5)
    missing = missing_file(root)  # found by the header check
    truncated = truncated_gzip(root)  # found only when the case is preprocessed
    dm = datamodule(root, tmp_path, on_bad_case="skip", val_fraction=0.4, cache="memory")
    dm.setup("fit")
    used = {c["case_id"] for c in dm.train_cases + dm.val_cases}
    assert used == {"case_2", "case_3", "case_4"}
    assert len(dm.train_ds) + len(dm.val_ds) == 3
    record = json.loads((tmp_path / "run" / "skipped_cases.json").read_text())
    problems = {s["case_id"]: " ".join(s["problems"]) for s in record["skipped"]}
    assert set(problems) == {"case_0", "case_1"}
    assert str(missing) in problems["case_1"] and "file not found" in problems["case_1"]
    assert str(truncated) in problems["case_0"] and "not a readable NIfTI" in problems["case_0"]
    # The partition still covers every case, so skipping never reshuffles it.
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(split["train"]) | set(split["val"]) == {f"case_{i}" for i in range(5)}


def test_error_mode_reports_every_case_that_fails_to_preprocess(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    first, second = truncated_gzip(root), corrupt_gzip(root)
    with pytest.raises(DataError) as err:
        datamodule(root, tmp_path, cache="disk", val_fraction=0.25).setup("fit")
    message = str(err.value)
    assert "2 cases cannot be used" in message and str(first) in message and str(second) in message
    leftovers = [
        p for p in (tmp_path / "preprocessed").rglob("*") if p.name.startswith(".") and p.name != ".leases"
    ]
    assert not leftovers, "no temp files"


@pytest.mark.slow
def test_check_cli_exit_status_and_output(tmp_path: Path, cache_dir: Path) -> None:
    good = make_msd_dataset(tmp_path / "good", num_cases=3)
    result = run_script(
        "seglight-check", "data=msd", f"data.root={good}", f"hydra.run.dir={tmp_path / 'c1'}", cache=cache_dir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shape (voxels)" in result.stdout and "OK: 3 cases passed" in result.stdout
    assert json.loads((tmp_path / "c1" / "check_report.json").read_text())["errors"] == []

    bad = make_msd_dataset(tmp_path / "bad", num_cases=3)
    nan_file, label_file = nan_values(bad), undeclared_label(bad)
    result = run_cli(
        "seglight.check", "data=msd", f"data.root={bad}", f"hydra.run.dir={tmp_path / 'c2'}", cache=cache_dir
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {nan_file}: has 1 NaN and 1 infinite voxel values" in result.stdout
    assert f"error: {label_file}: label values 3 are not among the declared labels" in result.stdout
    assert "seglight.check: error: 2 problem(s) in 2 of 3 cases" in result.stderr


@pytest.mark.slow
def test_training_cli_refuses_with_the_same_message(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad = affine_mismatch(root)
    result = train_on(root, tmp_path / "run", cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"seglight.train: error: {bad}: affine differs" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_config_reuses_the_training_data_group(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from seglight import compose

    for option in ("demo", "msd", "nnunet"):
        overrides = [f"data={option}"] + ([f"data.root={tmp_path}"] if option != "demo" else [])
        cfg = compose(overrides, config_name="check", output_dir=tmp_path)
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert container["data"]["_target_"] == "seglight.data.SegDataModule"
        assert container["task_name"] == "check" and container["workers"] is None
