"""The caches' size limit and ``python -m seglight.cache``: least recently used first, never what a run uses."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import fsspec
import pytest
import torch

from seglight import SegDataModule
from seglight.data.caching.files import cache_entries, files_under, hold
from seglight.data.dicom import dicom_volumes
from seglight.data.remote import RemoteCache
from tests.helpers import AXIAL, make_msd_dataset, nifti_with_affine, run_cli, write_dicom_series

WEEK = 7 * 24 * 3600


def datamodule(root: Path, cache: Path, **kwargs) -> SegDataModule:
    defaults = dict(
        root=str(root),
        spatial_size=[16, 16, 8],
        num_workers=0,
        val_fraction=0.25,
        cache="disk",
        cache_dir=str(cache / "preprocessed"),
        remote={"cache_dir": str(cache / "remote")},
        split_path=str(cache / "split.json"),
    )
    return SegDataModule(**{**defaults, **kwargs})


def last_used_a_week_ago(paths: list[Path]) -> None:
    """As if another run had used these entries a week ago, and nobody since."""
    then = time.time() - WEEK
    for path in paths:
        for file in [path] if path.is_file() else path.rglob("*"):
            os.utime(file, (then, then))


def remote_object(cache: Path, name: str, size: int) -> Path:
    """One object fetched into the remote-file cache (from fsspec's in-memory store), used a week ago."""
    url = f"memory://bucket/{name}"
    with fsspec.open(url, "wb") as handle:
        handle.write(os.urandom(size))
    local = RemoteCache(cache / "remote").fetch(url)
    last_used_a_week_ago([local.parent])
    return local.parent


@pytest.fixture
def caches(tmp_path: Path) -> tuple[Path, list[Path], SegDataModule]:
    """A cache with entries of an earlier setting (used a week ago) and of a run that is using it now."""
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    cache = tmp_path / "cache"
    datamodule(root, cache, a_min=0.0, a_max=255.0).setup("fit")  # another setting: other entries
    old = [e.path for e in cache_entries(cache / "preprocessed", "preprocessed")]
    last_used_a_week_ago(old)
    old.append(remote_object(cache, "old_scan.nii.gz", 50_000))
    reader = datamodule(root, cache)
    reader.setup("fit")  # holds the cache while it runs, as a training run does
    return cache, old, reader


@pytest.mark.slow
def test_prune_while_a_run_reads_the_cache(caches: tuple[Path, list[Path], SegDataModule]) -> None:
    cache, old, reader = caches
    env = f"paths.cache_dir={cache}"
    in_use = {e.path for e in cache_entries(cache / "preprocessed", "preprocessed")} - set(old)
    assert len(in_use) == 4 and len(old) == 5
    with open(old[0], "rb") as held:  # a reader that has an old entry open when it is removed
        result = run_cli("seglight.cache", "prune", "max_gb=0", env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert torch.load(held, weights_only=False)["image"].shape[1:] == (16, 16, 8)
    assert "Removed 5 entries" in result.stdout and "in use by pid" in result.stdout
    assert not any(p.exists() for p in old)
    assert {e.path for e in cache_entries(cache / "preprocessed", "preprocessed")} == in_use
    assert reader.train_ds[0]["image"].shape[1:] == (16, 16, 8)  # the run reads on, from its entries

    # clear keeps what the running run uses; once it has ended, everything goes.
    result = run_cli("seglight.cache", "clear", env)
    assert result.returncode == 0 and "Removed 0 entries" in result.stdout
    hold(cache / "preprocessed").release()
    result = run_cli("seglight.cache", "clear", env)
    assert "Removed 4 entries" in result.stdout and not cache_entries(cache / "preprocessed", "preprocessed")
    info = run_cli("seglight.cache", "info", env)
    assert "preprocessed" in info.stdout and "0 entries" in info.stdout and "in use" not in info.stdout
    prune_without_size = run_cli("seglight.cache", "prune", env)
    assert prune_without_size.returncode == 2 and "max_gb=<GB>" in prune_without_size.stderr


def test_cache_max_gb_removes_least_recently_used_first(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=4)
    cache = tmp_path / "cache"
    oldest = remote_object(cache, "oldest.nii.gz", 400_000)
    newer = remote_object(cache, "newer.nii.gz", 400_000)
    os.utime(newer / "newer.nii.gz", (time.time() - 3600, time.time() - WEEK))  # used an hour ago
    # 0.6 MB: the oldest object goes, the more recently used one and this run's own entries stay.
    dm = datamodule(root, cache, cache_max_gb=0.0006)
    dm.setup("fit")
    assert not oldest.exists() and newer.exists()
    assert len(cache_entries(cache / "preprocessed", "preprocessed")) == 4
    hold(cache / "preprocessed").release()


def test_the_dicom_cache_is_listed_and_pruned_as_the_others(tmp_path: Path) -> None:
    """Converted series and extracted zips are entries of a third cache, ``dicom``: least recently used first,
    and never what a running run (here, this process: it converted them) has used since it started."""
    cache = tmp_path / "cache"
    dicom = cache / "dicom"
    image = nifti_with_affine((20, 18, 16), AXIAL)
    write_dicom_series(tmp_path / "old", image, series_number=3)
    old = dicom_volumes(tmp_path / "old", cache_dir=dicom).volumes.popitem()[1].parent
    last_used_a_week_ago([old])  # converted by a run that ended a week ago
    write_dicom_series(tmp_path / "study" / "ct", image, series_number=4)
    archive = Path(shutil.make_archive(str(tmp_path / "study"), "zip", tmp_path / "study"))
    dicom_volumes(archive, cache_dir=dicom)  # extracted, then converted: two entries of this run
    env = f"paths.cache_dir={cache}"

    info = run_cli("seglight.cache", "info", env)
    assert info.returncode == 0, info.stderr[-2000:]
    assert re.search(
        rf"dicom +{re.escape(str(dicom))}: 3 entries, .*\n  in use by pid {os.getpid()}", info.stdout
    )
    assert len(cache_entries(dicom, "dicom")) == 3

    pruned = run_cli("seglight.cache", "prune", "max_gb=0", env)
    assert "Removed 1 entries" in pruned.stdout and not old.exists()
    kept = {e.path.relative_to(dicom).parts[0] for e in cache_entries(dicom, "dicom")}
    assert "zip" in kept and len(kept) == 2  # the zip's folder and the series converted from it

    hold(dicom).release()  # this run ends
    cleared = run_cli("seglight.cache", "clear", env)
    assert "Removed 2 entries" in cleared.stdout and not cache_entries(dicom, "dicom")


def test_walking_a_cache_skips_folders_another_process_removes_meanwhile(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "entry.nii.gz").write_bytes(b"x")
    (tmp_path / "top.pt").write_bytes(b"x")
    walk = iter(files_under(tmp_path))
    assert next(walk) == tmp_path / "top.pt"  # the folder's own files come first
    shutil.rmtree(tmp_path / "a")  # a concurrent prune
    shutil.rmtree(tmp_path / "b")
    assert list(walk) == []
