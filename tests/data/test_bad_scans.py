"""Scans that read but cannot train: NaN/Inf voxels, undeclared label values, gzip damage that still decodes.

Training finds them when it first reads each case, in every cache mode, for training and validation cases
alike, and says so with the line ``python -m seglight.check`` prints; ``data.on_bad_case=skip`` leaves them out.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight import SegDataModule
from seglight.core.errors import DataError
from seglight.data.settings import ModelNeeds
from tests.helpers import make_msd_dataset, run_cli, write_nifti


def with_values(path: Path, **voxels: float) -> Path:
    """Rewrite the NIfTI at ``path`` as float32 with some voxels set (``first=nan`` sets voxel (0, 0, 0))."""
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    for index, value in enumerate(voxels.values()):
        data[index, index, index] = value
    return write_nifti(path, data)


def corrupt_but_decodable(path: Path) -> Path:
    """Stored (uncompressed) gzip blocks with one voxel byte flipped: it decodes, only its CRC tells."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    packed = bytearray(gzip.compress(bytes(raw), compresslevel=0))
    packed[-100] ^= 0xFF  # inside the last voxels, before gzip's CRC and length
    path.write_bytes(bytes(packed))
    return path


def fixed_split(run_dir: Path, train: list[int], val: list[int]) -> None:
    """The split the run reuses (the same case ids): decides which bad case trains and which validates."""
    run_dir.mkdir(parents=True)
    record = {"seed": 0, "train": [f"case_{i}" for i in train], "val": [f"case_{i}" for i in val]}
    (run_dir / "split.json").write_text(json.dumps(record))


def check_lines(root: Path, tmp_path: Path) -> set[str]:
    """The error lines ``python -m seglight.check`` prints for this dataset (without its ``error: `` prefix)."""
    _, report = SegDataModule(root=str(root), cache_dir=str(tmp_path / "unused")).inspect(full=True)
    return {str(finding) for finding in report.errors}


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """8 cases: a NaN scan and a damaged gzip among the training cases, an Inf scan and a label 3 in validation."""
    root = make_msd_dataset(tmp_path_factory.mktemp("bad") / "ds", num_cases=8)
    bad = {
        "case_0": with_values(root / "imagesTr" / "case_0.nii.gz", a=np.nan, b=np.nan),
        "case_2": corrupt_but_decodable(root / "imagesTr" / "case_2.nii.gz"),
        "case_1": with_values(root / "imagesTr" / "case_1.nii.gz", a=np.inf),
        "case_3": root / "labelsTr" / "case_3.nii.gz",
    }
    label = np.asanyarray(nib.load(bad["case_3"]).dataobj).copy()
    label[0:2, 0:2, 0:2] = 3
    write_nifti(bad["case_3"], label)
    nib.load(bad["case_2"]).get_fdata()  # the damage decodes: only reading to gzip's end finds it
    return root, bad


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_bad_training_and_validation_scans_are_skipped_with_the_check_line(
    cache: str, bad_dataset: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    root, bad = bad_dataset
    run_dir = tmp_path / "run"
    fixed_split(run_dir, train=[0, 2, 4, 5, 6], val=[1, 3, 7])
    result = run_cli(
        "seglight.train",
        "data=msd",
        f"data.root={root}",
        "data.spatial_size=[16,16,8]",
        f"data.cache={cache}",
        f"data.cache_dir={tmp_path / 'preprocessed'}",
        # cache=none: the training cases are read, and checked, by a loader worker process
        f"data.num_workers={1 if cache == 'none' else 0}",
        "data.on_bad_case=skip",
        "model.init_filters=8",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "skipped_cases.json").read_text())
    problems = {entry["case_id"]: " ".join(entry["problems"]) for entry in record["skipped"]}
    assert set(problems) == set(bad)
    # Each skipped case carries exactly the line the dataset check prints for its file.
    expected = check_lines(root, tmp_path)
    assert set(problems.values()) == expected, (problems, expected)
    assert "has 2 NaN and 0 infinite voxel values" in problems["case_0"]
    assert "has 0 NaN and 1 infinite voxel values" in problems["case_1"]
    assert "truncated or corrupt" in problems["case_2"] and str(bad["case_2"]) in problems["case_2"]
    assert "label values 3 are not among the declared labels (0, 1)" in problems["case_3"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_nan_scan_found_by_a_loader_worker_stops_the_run_with_the_check_line(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    nan_scan = with_values(root / "imagesTr" / "case_2.nii.gz", a=np.nan)
    run_dir = tmp_path / "run"
    fixed_split(run_dir, train=[0, 2, 3], val=[1])  # validation is clean: the worker meets the NaN first
    result = run_cli(
        "seglight.train",
        "data=msd",
        f"data.root={root}",
        "data.spatial_size=[16,16,8]",
        "data.cache=none",
        "data.num_workers=1",
        "model.init_filters=8",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = check_lines(root, tmp_path)
    assert line.startswith(f"{nan_scan}: has 1 NaN")
    assert result.stderr.strip().splitlines()[-1] == f"seglight.train: error: {line}"


def test_without_declared_labels_the_model_classes_bound_the_label_values(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    label = root / "labelsTr" / "case_2.nii.gz"
    data = np.asanyarray(nib.load(label).dataobj).copy()
    data[0, 0, 0] = 2
    write_nifti(label, data)
    # A datalist without labels: only the model's classes (binary: 0 and 1) say which values can train.
    datalist = [
        {"image": str(p), "label": str(p).replace("imagesTr", "labelsTr")} for p in root.glob("imagesTr/*")
    ]
    dm = SegDataModule(datalist=datalist, spatial_size=[16, 16, 8], num_workers=0, val_fraction=0.34)
    dm.for_model(ModelNeeds(num_classes=2))  # what seglight.build passes from the model
    with pytest.raises(DataError) as error:
        dm.setup("fit")
    assert str(error.value).startswith(f"{label}: label values 2 are outside the model's classes 0..1")
