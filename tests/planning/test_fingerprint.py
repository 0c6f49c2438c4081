"""The fingerprint, read through the data module from real NIfTI files (local and on a real S3 API server)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight import SegDataModule
from seglight.core.errors import DataError
from seglight.planning.fingerprint import Fingerprint, fingerprint_dataset
from tests.helpers import S3, make_msd_dataset, make_planning_dataset


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict:
    for folder, data in (("imagesTr", image), ("labelsTr", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), root / folder / f"{name}.nii.gz")
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}


def test_geometry_is_in_ras_order_after_reorientation_and_cropping(tmp_path: Path) -> None:
    # The file's axis 0 runs along z (2 mm), axis 1 along x (1 mm), axis 2 along y (1.5 mm).
    affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.5, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    shape = (20, 12, 16)
    image = np.zeros(shape, np.float32)
    image[2:12, 3:9, 4:12] = 10.0  # non-zero region: 10 x 6 x 8 file voxels
    label = np.zeros(shape, np.uint8)
    label[3:7, 4:6, 5:8] = 1  # blob A: 4 x 2 x 3 file voxels = 24 voxels at 100
    label[9:11, 7:8, 10:11] = 1  # blob B: 2 x 1 x 1 = 2 voxels at 200
    image[3:7, 4:6, 5:8] = 100.0
    image[9:11, 7:8, 10:11] = 200.0
    entry = write_case(tmp_path, "case", image, label, affine)
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {"labels": {"0": "background", "1": "blob"}, "modality": {"0": "MRI"}, "training": [entry]}
        )
    )
    fingerprint = fingerprint_dataset(SegDataModule(root=str(tmp_path), num_workers=1))
    case = fingerprint.cases[0]
    assert case.shape == [12, 16, 20] and case.spacing == [1.0, 1.5, 2.0]  # x, y, z
    assert case.cropped_shape == [6, 8, 10] and case.kept_fraction == pytest.approx(480 / 3840)
    assert case.orientation == "SRA"  # as stored: axis 0 superior, 1 right, 2 anterior
    objects = case.objects[1]
    assert objects["components"] == 2
    # Blob A: 2 voxels along x (1 mm), 3 along y (1.5 mm), 4 along z (2 mm); volume 24 x 3 mm^3.
    assert objects["extents_mm"][0] == [2.0, 4.5, 8.0] and objects["volumes_mm3"][0] == pytest.approx(72.0)
    assert objects["extents_mm"][1] == [1.0, 1.5, 4.0] and objects["specks"] == 1  # blob B: under 10 voxels
    # Every foreground voxel is sampled (26 < the sample size): 24 at 100 and 2 at 200.
    foreground = fingerprint.channels[0].foreground
    assert foreground["samples"] == 26 and foreground["mean"] == pytest.approx(
        (24 * 100 + 2 * 200) / 26, abs=1e-3
    )
    assert (foreground["min"], foreground["max"]) == (100.0, 200.0)
    assert fingerprint.channels[0].modality == "MRI" and fingerprint.channels[0].source == "dataset.json"
    label_stats = fingerprint.label_statistics()[1]
    assert label_stats["voxel_share"] == pytest.approx(26 / 3840) and label_stats["components_max"] == 2
    assert fingerprint.anisotropy() == {"ratio": 2.0, "coarse_axis": "z", "fine_axis": "x"}


def test_modality_is_guessed_from_intensities_and_the_json_reads_back(tmp_path: Path) -> None:
    cases = [((16, 16, 8), (1.0, 1.0, 2.0))] * 2
    ct = make_planning_dataset(tmp_path / "ct", cases, declared=False)
    mri = make_planning_dataset(tmp_path / "mri", cases, modality="MRI", declared=False, body=0.5)
    ct_print = fingerprint_dataset(SegDataModule(root=str(ct), num_workers=2))
    mri_print = fingerprint_dataset(SegDataModule(root=str(mri), num_workers=2))
    assert ct_print.channels[0].modality == "CT" and "air in HU" in ct_print.channels[0].source
    assert mri_print.channels[0].modality == "other" and "so not CT" in mri_print.channels[0].source
    assert mri_print.median_kept_fraction() == pytest.approx(0.5 * 0.5 * 0.5)
    saved = json.loads(json.dumps(mri_print.to_dict()))
    assert Fingerprint.from_dict(saved).to_dict() == saved


def test_a_bad_case_stops_the_fingerprint_or_is_skipped(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    label = root / "labelsTr" / "case_1.nii.gz"
    label.write_bytes(label.read_bytes()[:-40])  # a truncated download: the header reads, the data does not
    with pytest.raises(DataError, match="case_1.nii.gz: not a readable NIfTI image"):
        fingerprint_dataset(SegDataModule(root=str(root), num_workers=1))
    fingerprint = fingerprint_dataset(SegDataModule(root=str(root), num_workers=1, on_bad_case="skip"))
    assert fingerprint.num_cases == 2 and fingerprint.skipped[0]["case_id"] == "case_1"


def test_a_dataset_on_s3_is_fingerprinted_from_the_remote_cache(s3: S3, tmp_path: Path) -> None:
    url = s3.upload(make_msd_dataset(tmp_path / "ds", num_cases=3), "plan-bucket", "ds")
    datamodule = SegDataModule(root=url, num_workers=2, remote={"cache_dir": str(tmp_path / "remote")})
    fingerprint = fingerprint_dataset(datamodule)
    assert fingerprint.num_cases == 3 and fingerprint.source["root"] == url
    assert fingerprint.cases[0].shape == [20, 20, 12] and fingerprint.cases[0].spacing == [1.0, 1.0, 2.0]
    assert fingerprint.label_statistics()[1]["voxel_share"] == pytest.approx(8 * 8 * 6 / (20 * 20 * 12))
