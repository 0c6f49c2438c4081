"""The preprocessing cache: once per case, kept across runs on disk, redone when a file or a setting changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seglight import SegDataModule
from seglight.data.caching.datasets import pipeline_signature, split_pipeline
from tests.helpers import make_msd_dataset, write_nifti


def module(root: Path, tmp_path: Path, **kwargs) -> SegDataModule:
    defaults = dict(
        root=str(root),
        spatial_size=[16, 16, 8],
        num_workers=0,
        val_fraction=0.25,
        split_seed=1,
        cache="disk",
        cache_dir=str(tmp_path / "preprocessed"),
        split_path=str(tmp_path / "run" / "split.json"),
    )
    return SegDataModule(**{**defaults, **kwargs})


def entries(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}


def test_disk_cache_persists_and_is_invalidated_by_files_and_settings(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    cache = tmp_path / "preprocessed"
    first = module(root, tmp_path)
    first.setup("fit")
    made = entries(cache)
    assert len(made) == 4, "one entry per case, train and validation alike"
    reference = first.val_ds[0]

    # A second run with the same data and settings computes nothing and gives the same tensors.
    second = module(root, tmp_path)
    second.setup("fit")
    assert entries(cache) == made
    assert torch.equal(second.val_ds[0]["image"], reference["image"])

    # A changed source file is preprocessed again, alone.
    changed = root / "imagesTr" / "case_1.nii.gz"
    write_nifti(changed, np.full((20, 20, 12), 500.0, np.float32))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    module(root, tmp_path).setup("fit")
    after_file = entries(cache)
    assert len(after_file) == 5 and set(made) < set(after_file)

    # Another deterministic setting (the intensity window) makes new entries for every case.
    module(root, tmp_path, a_min=0.0, a_max=255.0).setup("fit")
    assert len(entries(cache)) == 9
    leftovers = [
        p for p in cache.iterdir() if p.name.startswith(".") and p.name != ".leases"
    ]  # a run's lease
    assert not leftovers, "no temporary files left"


def test_damaged_disk_entry_is_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    dm = module(root, tmp_path, val_fraction=0.5)
    dm.setup("fit")
    expected = dm.val_ds[0]["image"].clone()
    for entry in (tmp_path / "preprocessed").glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:100])  # as a full disk or a killed copy would leave it
    again = module(root, tmp_path, val_fraction=0.5)
    again.setup("fit")
    assert torch.equal(again.val_ds[0]["image"], expected)
    again.train_ds[0]  # a damaged entry is found, and replaced, when it is read
    assert "damaged" in caplog.text
    assert all(p.stat().st_size > 1000 for p in (tmp_path / "preprocessed").glob("*.pt"))


def test_memory_cache_runs_the_random_part_on_a_copy(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    dm = module(root, tmp_path, cache="memory", val_fraction=0.5)
    dm.setup("fit")
    cached = dm.train_ds.data[0]["image"].clone()
    flips = {bool(torch.equal(dm.train_ds[0]["image"], cached)) for _ in range(30)}
    assert flips == {True, False}, "the flip is drawn anew each time"
    assert torch.equal(dm.train_ds.data[0]["image"], cached), "the cached copy never changes"


def test_pipeline_signature_follows_the_settings(tmp_path: Path) -> None:
    a = module(tmp_path, tmp_path).transforms(train=True)
    b = module(tmp_path, tmp_path).transforms(train=True)
    c = module(tmp_path, tmp_path, spatial_size=[16, 16, 16]).transforms(train=True)
    det_a, random_a = split_pipeline(a)
    assert [type(t).__name__ for t in random_a.transforms] == ["RandFlipd"]
    assert pipeline_signature(det_a) == pipeline_signature(split_pipeline(b)[0])
    assert pipeline_signature(det_a) != pipeline_signature(split_pipeline(c)[0])
    # The random suffix is not part of what is cached, so validation and training share entries.
    assert pipeline_signature(det_a) == pipeline_signature(
        split_pipeline(module(tmp_path, tmp_path).transforms(False))[0]
    )
