"""Each kind of bad input ends with one clear message naming the file or option, and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_msd_dataset, run_cli, train_on

pytestmark = pytest.mark.slow


def assert_clean_failure(result, *needles: str) -> str:
    assert result.returncode != 0
    err = result.stderr
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, err[-3000:]
    return err


def test_root_without_dataset_json(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = train_on(tmp_path / "empty", tmp_path / "run", cache_dir)
    assert_clean_failure(result, str(tmp_path / "empty" / "dataset.json"), "not found")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_json_without_training(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"name": "x", "test": []}))
    result = train_on(root, tmp_path / "run", cache_dir)
    assert_clean_failure(result, "dataset.json", '"training"')


def test_listed_file_missing(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    result = train_on(root, tmp_path / "run", cache_dir)
    assert_clean_failure(result, str(root / "labelsTr" / "case_1.nii.gz"), "file not found")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_file_that_is_not_nifti(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad = root / "imagesTr" / "case_2.nii.gz"
    bad.write_text("this is not an image\n")
    result = train_on(root, tmp_path / "run", cache_dir)
    assert_clean_failure(result, str(bad), "not a readable NIfTI")


def test_truncated_nifti_is_named(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad = root / "imagesTr" / "case_0.nii.gz"
    bad.write_bytes(bad.read_bytes()[:-400])  # header intact, data cut short
    result = train_on(root, tmp_path / "run", cache_dir)
    assert_clean_failure(result, str(bad), "not a readable NIfTI")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_name(tmp_path: Path, cache_dir: Path) -> None:
    result = run_cli(
        "seglight.train", "model=nosuchnet", f"hydra.run.dir={tmp_path / 'run'}", cache=cache_dir
    )
    assert_clean_failure(result, "model/nosuchnet", "segresnet")


def test_unknown_network_target(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    result = train_on(root, tmp_path / "run", cache_dir, "model._target_=monai.networks.nets.NoSuchNet")
    assert_clean_failure(result, "monai.networks.nets.NoSuchNet")


def test_missing_checkpoint_path(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    result = train_on(root, tmp_path / "run", cache_dir, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert_clean_failure(result, "nope.ckpt", "no such checkpoint")


def test_truncated_nifti_found_in_a_loader_worker_is_named(tmp_path: Path, cache_dir: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    bad = root / "imagesTr" / "case_0.nii.gz"
    bad.write_bytes(bad.read_bytes()[:-400])
    result = train_on(root, tmp_path / "run", cache_dir, "data.cache=none", "data.num_workers=2")
    err = assert_clean_failure(result, str(bad), "not a readable NIfTI")
    assert "DataLoader worker" not in err
