"""A full disk while writing a checkpoint, a cache entry, a prediction or TensorBoard events: one message naming the
folder and the space needed, exit status 2, the previous checkpoint intact and nothing half-written under a final
name.

Each test mounts a real size-limited file system (tmpfs) and fills it; where mounting is not allowed (it needs
root), the tests are skipped, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from seglight.core.errors import DiskFullError, reported_errors
from seglight.data.remote import RemoteCache
from seglight.prediction.cases import predict
from seglight.training.checkpoints import safe_load
from tests.faults.integrity import damaged_files
from tests.helpers import S3, tiny_overrides, train_in_process, write_nifti

MB = 2**20


def fill(disk: Path, leave: int) -> None:
    """Take all of ``disk``'s free space but ``leave`` bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler.bin", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no message on stderr"
    return lines[-1]


def partial_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [*[o for o in tiny_overrides(run_dir) if not o.startswith("hydra.")], *extra]


def test_checkpoint_write_on_a_full_disk(
    small_disk, trained_run: Path, capsys: pytest.CaptureFixture
) -> None:
    disk = small_disk(64 * MB)
    run_dir = disk / "run"
    shutil.copytree(trained_run, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = safe_load(last)["global_step"]
    fill(disk, 4 * MB)  # room for the run's small files, not for a 14 MB checkpoint
    status = train_in_process(overrides(run_dir, "trainer.max_epochs=3", "resume=true"), run_dir, quiet=False)
    message = error_line(capsys)
    assert status == 2, message
    found = re.match(
        rf"seglight\.train: error: {re.escape(str(run_dir / 'checkpoints'))}: disk full: writing \S+\.ckpt "
        r"needs about (\d+\.\d) MB, (\d+\.\d) MB free; ",
        message,
    )
    assert found, message
    assert 10 < float(found.group(1)) < 20 and float(found.group(2)) < 5  # a checkpoint is 14 MB
    assert safe_load(last)["global_step"] == before  # the previous checkpoint, intact
    assert partial_files(run_dir) == []
    assert damaged_files(run_dir, trackers=False) == []


def test_cache_entry_on_a_full_disk(small_disk, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    disk = small_disk(1 * MB)
    fill(disk, 8 * 1024)  # less than one preprocessed case
    run_dir = tmp_path / "run"
    cache = disk / "preprocessed"
    status = train_in_process(
        overrides(run_dir, "data.cache=disk", f"data.cache_dir={cache}", "trainer.max_epochs=1"), run_dir
    )
    message = error_line(capsys)
    assert status == 2, message
    assert re.match(
        rf"seglight\.train: error: {re.escape(str(cache))}: disk full: writing \w+\.pt needs about \d+ kB, "
        r"\d+ kB free; ",
        message,
    ), message
    assert partial_files(disk) == [] and not list(cache.glob("*.pt"))


def test_tensorboard_events_on_a_full_disk(small_disk, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    disk = small_disk(1 * MB)
    fill(disk, 0)
    run_dir = tmp_path / "run"
    extra = [f"logger.tensorboard.save_dir={disk}", "trainer.max_epochs=1"]
    status = train_in_process(overrides(run_dir, *extra), run_dir, quiet=False)
    message = error_line(capsys)
    assert status == 2, message
    assert message.startswith(f"seglight.train: error: {disk / 'tensorboard'}: disk full: "), message
    needs = (
        r"the run's next checkpoint needs about \d+\.\d MB, \d+ kB free; free some space there, then continue"
    )
    assert re.search(needs, message), message


def test_prediction_on_a_full_disk(
    small_disk, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    disk = small_disk(1 * MB)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_nifti(
            tmp_path / "scans" / f"{name}.nii.gz", rng.normal(0, 100, (24, 24, 16)).astype(np.float32)
        )
    fill(disk, 2 * 1024)  # a mask takes a few kB more
    output = disk / "masks"
    with pytest.raises(SystemExit) as status, reported_errors("seglight.predict"):
        predict(trained_run, tmp_path / "scans", output, device="cpu")
    message = error_line(capsys)
    assert status.value.code == 2, message
    assert re.match(
        rf"seglight\.predict: error: {re.escape(str(output))}: disk full: writing a\.nii\.gz needs about \d+ kB, "
        r"\d+ kB free; ",
        message,
    ), message
    assert not list(output.glob("*.nii.gz")) and partial_files(disk) == []


def test_download_into_a_full_cache_disk(small_disk, s3: S3) -> None:
    disk = small_disk(1 * MB)
    s3.client.create_bucket(Bucket="full-disk")
    s3.client.put_object(Bucket="full-disk", Key="scan.nii.gz", Body=os.urandom(200_000))
    fill(disk, 16 * 1024)
    with pytest.raises(DiskFullError) as err:
        RemoteCache(disk / "remote").fetch("s3://full-disk/scan.nii.gz")
    folder = disk / "remote" / "s3" / "full-disk"
    assert re.match(
        rf"{re.escape(str(folder))}/scan\.nii\.gz@\w+: disk full: writing scan\.nii\.gz needs about 0\.2 MB, \d+ kB free",
        str(err.value),
    ), str(err.value)
    assert [
        p for p in disk.rglob("*") if p.is_file() and p.name != "filler.bin" and ".locks" not in p.parts
    ] == []
