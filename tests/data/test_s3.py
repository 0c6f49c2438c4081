"""s3:// datasets through a real S3 API server (moto's standalone server on loopback), reached over HTTP.

The endpoint is given the standard way (``AWS_ENDPOINT_URL``) or through ``data.remote.endpoint_url``; nothing
in the client is patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
import pytest
from fsspec.callbacks import Callback

from seglight import SegDataModule
from seglight.core.errors import DataError
from seglight.data.remote import RemoteCache, RemoteError
from tests.helpers import S3, SECRET, free_port, make_msd_dataset, run_cli, write_nifti

FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def files_in(folder: Path) -> list[Path]:
    """Cached files, lock files aside."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name != ".locks")


def test_cold_then_warm_cache_then_changed_object(s3: S3, tmp_path: Path) -> None:
    local = make_msd_dataset(tmp_path / "ds", num_cases=3)
    url = s3.upload(local, "cache-bucket", "train")
    objects = [f"{url}/imagesTr/case_{i}.nii.gz" for i in range(3)] + [f"{url}/labelsTr/case_0.nii.gz"]

    cold = RemoteCache(tmp_path / "remote")
    fetched, problems = cold.fetch_all(objects)
    assert not problems and cold.downloaded == 4
    for obj, path in fetched.items():
        assert path.read_bytes() == (local / obj.split("/train/", 1)[1]).read_bytes()
        assert "cache-bucket/train" in str(path)
    usage = cold.usage()
    assert usage.files == 4 and usage.bytes == sum(p.stat().st_size for p in fetched.values())
    mtimes = {p: p.stat().st_mtime_ns for p in fetched.values()}

    warm = RemoteCache(tmp_path / "remote")  # a new run: nothing is downloaded again
    again, _ = warm.fetch_all(objects)
    assert warm.downloaded == 0 and again == fetched
    assert {p: p.stat().st_mtime_ns for p in again.values()} == mtimes

    # The object changes: the next run fetches the new version and drops the old one.
    changed = objects[0]
    new_image = tmp_path / "new.nii.gz"
    write_nifti(new_image, np.full((20, 20, 12), 7.0, np.float32))
    s3.client.put_object(
        Bucket="cache-bucket", Key="train/imagesTr/case_0.nii.gz", Body=new_image.read_bytes()
    )
    later = RemoteCache(tmp_path / "remote")
    newest, _ = later.fetch_all(objects)
    assert later.downloaded == 1
    assert newest[changed] != fetched[changed] and not fetched[changed].exists()
    assert np.all(nib.load(newest[changed]).get_fdata() == 7.0)
    assert len(files_in(tmp_path / "remote")) == 4


def _fetch_in_process(cache_dir: str, url: str) -> tuple[str, int]:
    cache = RemoteCache(Path(cache_dir))
    return str(cache.fetch(url)), cache.downloaded


def test_several_processes_share_one_download(s3: S3, tmp_path: Path) -> None:
    s3.client.create_bucket(Bucket="shared-bucket")
    s3.client.put_object(Bucket="shared-bucket", Key="big.nii.gz", Body=os.urandom(4 * 2**20))
    url = "s3://shared-bucket/big.nii.gz"
    with ProcessPoolExecutor(3, mp_context=get_context("fork")) as pool:
        results = list(pool.map(_fetch_in_process, [str(tmp_path / "remote")] * 3, [url] * 3))
    assert len({path for path, _ in results}) == 1
    assert sum(count for _, count in results) == 1, "the file lock lets one process download, the others wait"
    assert [p.stat().st_size for p in files_in(tmp_path / "remote")] == [4 * 2**20]


class StopServerMidway(Callback):
    """Kills the server once the first MiB has arrived, as a crash or network cut would."""

    def __init__(self, server: subprocess.Popen) -> None:
        super().__init__()
        self.server = server

    def call(self, *args, **kwargs) -> None:
        if self.value > 2**20 and self.server.poll() is None:
            self.server.kill()
            self.server.wait()


def test_interrupted_download_leaves_nothing_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own server, so its own credentials: the test must not depend on what an earlier test left in the
    # environment (the suite passes in any order).
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="k",
            aws_secret_access_key="s",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="flaky-bucket")
        client.put_object(Bucket="flaky-bucket", Key="scan.nii.gz", Body=os.urandom(48 * 2**20))
        cache = RemoteCache(tmp_path / "remote", endpoint_url=endpoint, options=FAST_FAIL)
        with pytest.raises(RemoteError) as err:
            cache.fetch("s3://flaky-bucket/scan.nii.gz", callback=StopServerMidway(server))
    finally:
        server.kill()
        server.wait()
    message = str(err.value)
    assert message.startswith("s3://flaky-bucket/scan.nii.gz: download interrupted")
    assert "nothing was kept in the cache" in message and "\n" not in message
    assert files_in(tmp_path / "remote") == [], "no partial or temporary file is left"


def test_missing_bucket_is_one_clear_message(s3: S3, tmp_path: Path) -> None:
    dm = SegDataModule(root="s3://no-such-bucket/ds", remote={"cache_dir": str(tmp_path / "remote")})
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert (
        str(err.value)
        == f"s3://no-such-bucket/ds/dataset.json: bucket 'no-such-bucket' does not exist at {s3.endpoint}"
    )


def test_missing_key_names_the_object(s3: S3, tmp_path: Path) -> None:
    url = s3.upload(make_msd_dataset(tmp_path / "ds", num_cases=3), "holey-bucket", "ds")
    s3.client.delete_object(Bucket="holey-bucket", Key="ds/labelsTr/case_1.nii.gz")
    dm = SegDataModule(
        root=url, spatial_size=[16, 16, 8], num_workers=0, remote={"cache_dir": str(tmp_path / "remote")}
    )
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(err.value) == f"{url}/labelsTr/case_1.nii.gz: no such object in bucket 'holey-bucket'"


def set_auth_free_requests(endpoint: str, count: str) -> None:
    """moto's INITIAL_NO_AUTH_ACTION_COUNT, set on the running server: requests allowed before auth is enforced."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request).read()


def test_bad_credentials_are_one_clear_message(s3: S3, tmp_path: Path) -> None:
    url = s3.upload(make_msd_dataset(tmp_path / "ds", num_cases=3), "locked-bucket", "ds")
    # moto's auth enforcement: from now on every request must be signed by a known IAM user's key.
    set_auth_free_requests(s3.endpoint, "0")
    try:
        dm = SegDataModule(root=url, remote={"cache_dir": str(tmp_path / "remote")})
        with pytest.raises(DataError) as err:
            dm.setup("fit")
    finally:
        set_auth_free_requests(s3.endpoint, "inf")
    message = str(err.value)
    assert message.startswith(f"{url}/dataset.json: access denied by {s3.endpoint}")
    assert "check the AWS credentials" in message and "\n" not in message
    assert SECRET not in message


def test_endpoint_from_the_config_option(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = make_msd_dataset(tmp_path / "ds", num_cases=3)
    url = s3.upload(local, "option-bucket", "ds")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)  # the S3-only variable works as well
    fetched, _ = RemoteCache(tmp_path / "via-env").fetch_all([f"{url}/dataset.json"])
    assert json.loads(fetched[f"{url}/dataset.json"].read_text())["name"] == "tiny"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # now only data.remote.endpoint_url says where the store is
    dm = SegDataModule(
        root=url,
        spatial_size=[16, 16, 8],
        num_workers=0,
        val_fraction=0.34,
        remote={"cache_dir": str(tmp_path / "remote"), "endpoint_url": s3.endpoint},
    )
    assert dm.label_names == {0: "background", 1: "cube"} and dm.num_input_channels == 1
    dm.setup("fit")
    assert {c["case_id"] for c in dm.train_cases + dm.val_cases} == {"case_0", "case_1", "case_2"}
    assert all(str(tmp_path / "remote") in c["image"] for c in dm.train_cases)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 8)


def test_credentials_in_the_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="credentials do not belong in the config"):
        SegDataModule(root="s3://b/ds", remote={"options": {"secret": "x"}})


@pytest.mark.slow
def test_train_and_check_on_s3(s3: S3, tmp_path: Path, cache_dir: Path) -> None:
    local = make_msd_dataset(tmp_path / "ds", num_cases=4)
    url = s3.upload(local, "train-bucket", "lab/ds")
    remote_cache = tmp_path / "remote"
    run_dir = tmp_path / "run"
    result = run_cli(
        "seglight.train",
        "data=msd",
        f"data.root={url}",
        f"data.remote.cache_dir={remote_cache}",
        "data.spatial_size=[16,16,8]",
        "data.num_workers=0",
        "model.init_filters=8",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(files_in(remote_cache)) == 8
    log = (run_dir / "train.log").read_text()
    assert "Remote files: 8 of 8 fetched now" in log and str(remote_cache) in log
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 4
    # The secret key is in the environment of the run, and nowhere in what it saved.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    # The check against the same bucket, with one bad label: named by its URL, non-zero exit.
    label = np.asanyarray(nib.load(local / "labelsTr" / "case_3.nii.gz").dataobj).copy()
    label[0, 0, 0] = 5
    write_nifti(tmp_path / "bad.nii.gz", label)
    s3.client.put_object(
        Bucket="train-bucket",
        Key="lab/ds/labelsTr/case_3.nii.gz",
        Body=(tmp_path / "bad.nii.gz").read_bytes(),
    )
    result = run_cli(
        "seglight.check",
        "data=msd",
        f"data.root={url}",
        f"data.remote.cache_dir={remote_cache}",
        f"hydra.run.dir={tmp_path / 'check'}",
        cache=cache_dir,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: {url}/labelsTr/case_3.nii.gz: label values 5 are not among the declared labels"
        in result.stdout
    )
    assert f"remote file cache: {remote_cache}" in result.stdout
