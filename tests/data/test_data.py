"""The demo dataset, datalists, transforms and SegDataModule, on real NIfTI files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seglight import SegDataModule
from seglight.core.errors import ConfigError, DataError
from seglight.data.datalists import read_msd_datalist
from seglight.data.demo import demo_root, ensure_demo_dataset
from tests.helpers import make_msd_dataset


def test_demo_dataset_is_real_ct_like_nifti_and_reused(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path, num_cases=3, shape=(32, 28, 12), spacing=(0.8, 0.8, 2.5), seed=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert len(meta["training"]) == 3 and meta["labels"]["1"] == "organ"
    image = nib.load(root / meta["training"][0]["image"])
    label = nib.load(root / meta["training"][0]["label"])
    assert image.shape == label.shape == (32, 28, 12)
    assert np.allclose(np.abs(np.diag(image.affine))[:3], [0.8, 0.8, 2.5])
    assert np.allclose(image.affine, label.affine)
    hu = np.asanyarray(image.dataobj)
    assert hu.min() < -900 and 60 < np.percentile(hu[np.asanyarray(label.dataobj) == 1], 50) < 250
    assert set(np.unique(np.asanyarray(label.dataobj))) == {0, 1}
    # Second call reuses the files (no rewrite) and the same settings give the same folder.
    mtime = (root / "dataset.json").stat().st_mtime_ns
    assert (
        ensure_demo_dataset(tmp_path, num_cases=3, shape=(32, 28, 12), spacing=(0.8, 0.8, 2.5), seed=1)
        == root
    )
    assert (root / "dataset.json").stat().st_mtime_ns == mtime
    assert demo_root(tmp_path, num_cases=3, shape=(32, 28, 12), spacing=(0.8, 0.8, 2.5), seed=1) == root
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_demo_generation_is_deterministic(tmp_path: Path) -> None:
    a = ensure_demo_dataset(tmp_path / "a", num_cases=2, shape=(16, 16, 8), seed=3)
    b = ensure_demo_dataset(tmp_path / "b", num_cases=2, shape=(16, 16, 8), seed=3)
    for name in ("imagesTr/demo_001.nii.gz", "labelsTr/demo_001.nii.gz"):
        assert np.array_equal(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata())


def test_the_ct_demo_is_what_it_was_before_the_mr_option(tmp_path: Path) -> None:
    # Runs and disk caches key on the demo's folder and files: the CT demo keeps both (values taken before
    # data.demo.modality existed).
    root = ensure_demo_dataset(tmp_path, num_cases=2, shape=(16, 16, 8), seed=3, modality="ct")
    assert root.name == "ct2_16x16x8_l1_s3_0c465eb3d5"
    digest = hashlib.sha256()
    for name in ("imagesTr/demo_001.nii.gz", "labelsTr/demo_001.nii.gz"):
        voxels = np.asanyarray(nib.load(root / name).dataobj)
        digest.update(voxels.tobytes())
        digest.update(str(voxels.dtype).encode())
    assert digest.hexdigest() == "7e45f02ef7022b7ebdb06954bb895356118acdc22265f86c485b3825a8813b1f"


def test_mr_demo_has_the_same_anatomy_without_hounsfield_units(tmp_path: Path) -> None:
    ct = ensure_demo_dataset(tmp_path, num_cases=3, shape=(32, 28, 12), seed=1)
    mr = ensure_demo_dataset(tmp_path, num_cases=3, shape=(32, 28, 12), seed=1, modality="mr")
    assert mr.name.startswith("mr3_32x28x12_") and mr != ct
    assert json.loads((mr / "dataset.json").read_text())["modality"] == {"0": "MRI"}
    medians = []
    for index in range(3):
        name = f"demo_{index:03d}.nii.gz"
        label = np.asanyarray(nib.load(mr / "labelsTr" / name).dataobj)
        assert np.array_equal(label, np.asanyarray(nib.load(ct / "labelsTr" / name).dataobj))
        image = np.asanyarray(nib.load(mr / "imagesTr" / name).dataobj)
        assert image.dtype == np.uint16 and image.min() >= 0  # no air at -1000
        organ, outside = np.median(image[label == 1]), np.median(image[label == 0])
        assert organ > outside
        medians.append(organ)
    assert max(medians) / min(medians) > 1.1  # each scan its own gain: no one window fits all
    with pytest.raises(ConfigError, match="data.demo.modality must be one of ct, mr"):
        ensure_demo_dataset(tmp_path, num_cases=1, modality="pet")


def test_two_label_demo(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path, num_cases=1, shape=(32, 32, 16), num_labels=2)
    label = np.asanyarray(nib.load(root / "labelsTr/demo_000.nii.gz").dataobj)
    assert set(np.unique(label)) == {0, 1, 2}


def test_msd_datalist_resolves_relative_and_absolute_paths(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = str(root / meta["training"][1]["image"])
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = read_msd_datalist(root)
    assert [c["case_id"] for c in cases] == ["case_0", "case_1"]
    assert all(Path(c["image"]).is_absolute() and Path(c["image"]).is_file() for c in cases)


def make_module(root: Path, tmp_path: Path, **kwargs) -> SegDataModule:
    defaults = dict(
        root=str(root),
        spatial_size=[16, 16, 8],
        num_workers=0,
        batch_size=2,
        val_fraction=0.25,
        split_seed=7,
        split_path=str(tmp_path / "run" / "split.json"),
    )
    return SegDataModule(**{**defaults, **kwargs})


def test_datamodule_batches_split_and_nearest_label_resize(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    dm = make_module(root, tmp_path)
    dm.setup("fit")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 3 and len(split["val"]) == 1 and split["seed"] == 7
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["label"].shape == (2, 1, 16, 16, 8)
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    # Nearest-neighbour resizing keeps the label binary (trilinear would create fractions).
    assert set(torch.unique(batch["label"]).tolist()) == {0.0, 1.0}
    # Label maps travel as uint8 (a quarter of the bytes to cache, flip and collate); images stay float32.
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.uint8
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[0] == 1 and val["label"].dtype == torch.uint8
    # A second data module with the same split file reuses the saved split, even with another seed.
    again = make_module(root, tmp_path, split_seed=99)
    again.setup("fit")
    assert [c["case_id"] for c in again.val_cases] == split["val"]


def test_compact_labels_keep_values_uint8_cannot_hold() -> None:
    from seglight.data.transforms import CompactLabeld

    compact = CompactLabeld(keys="label")
    assert compact({"label": torch.tensor([[0.0, 1.0, 255.0]])})["label"].dtype == torch.uint8
    for odd in ([0.0, 0.5], [-1.0, 1.0], [0.0, 256.0]):  # stay float32, so the checks see the real values
        label = compact({"label": torch.tensor([odd])})["label"]
        assert label.dtype == torch.float32 and label.tolist() == [odd]


def test_random_flip_fast_path_matches_monai() -> None:
    from monai import transforms as mt

    from seglight.data.transforms import RandFlipd

    image, label = torch.rand(1, 6, 5, 4), (torch.rand(1, 6, 5, 4) > 0.5).to(torch.uint8)
    ours = RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0).set_random_state(3)
    monai = mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0).set_random_state(3)
    flips = set()
    for _ in range(20):
        got, want = ours({"image": image, "label": label}), monai({"image": image, "label": label})
        for key in ("image", "label"):
            assert type(got[key]) is torch.Tensor and torch.equal(got[key], want[key].as_tensor())
        flips.add(not torch.equal(got["image"], image))
    assert flips == {True, False}


def test_custom_label_key_and_inline_datalist(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3, label_key="mask")
    entries = json.loads((root / "dataset.json").read_text())["training"]
    dm = make_module(root, tmp_path, datalist=entries, label_key="mask", cache="none", val_fraction=0.34)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"image", "label"}
    with pytest.raises(DataError, match="no 'mask' key"):
        make_module(make_msd_dataset(tmp_path / "ds2", num_cases=2), tmp_path, label_key="mask").setup("fit")


def test_intensity_window_is_configurable(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    dm = make_module(root, tmp_path, a_min=0.0, a_max=255.0, val_fraction=0.5)
    dm.setup("fit")
    image = dm.train_ds[0]["image"]
    # The cube is ~ +200, the background ~ -200: with a 0..255 window the background clips to 0.
    assert float((image == 0).float().mean()) > 0.5 and float(image.max()) > 0.6


def test_num_workers_clamped_to_available_cpus(tmp_path: Path) -> None:
    from seglight.data.loaders import available_cpus

    dm = make_module(tmp_path, tmp_path, num_workers=512)
    assert dm.num_workers == available_cpus()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_size": [16, 16]}, "spatial_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"a_min": 10.0, "a_max": 0.0}, "a_max"),
        ({"cache": "ram"}, "data.cache"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_module(tmp_path, tmp_path, **kwargs)
