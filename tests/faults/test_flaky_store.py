"""A flaky object store: reads from S3 are retried with backoff and resumed where they broke off; a store that keeps
failing stops with one line naming the object.

The faults come from a proxy on loopback (``tests/faults/proxy.py``) in front of the real test S3 server, reached
as the S3 endpoint by the same client code that talks to AWS.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from seglight import SegDataModule
from seglight.data.remote import RemoteCache, RemoteError
from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import S3, make_msd_dataset

SIZE = 1_000_000
# Short client timeouts, so a stalled read is noticed in a second rather than botocore's default minute.
QUICK = {"config_kwargs": {"read_timeout": 0.5, "connect_timeout": 1}}


@pytest.fixture(scope="module")
def scan(s3: S3) -> tuple[str, bytes]:
    """One 1 MB object in the test store, and its bytes."""
    data = os.urandom(SIZE)
    s3.client.create_bucket(Bucket="flaky-store")
    s3.client.put_object(Bucket="flaky-store", Key="scans/scan.nii.gz", Body=data)
    return "s3://flaky-store/scans/scan.nii.gz", data


def fetch_through(proxy: FaultProxy, cache_dir: Path, url: str, **kwargs) -> tuple[Path, RemoteCache]:
    cache = RemoteCache(cache_dir, endpoint_url=proxy.url, options=QUICK, backoff_s=0.05, **kwargs)
    return cache.fetch(url), cache


def ranges_after_faults(proxy: FaultProxy) -> list[int]:
    """Where each ranged GET that followed a fault started."""
    starts, faulted = [], False
    for request in proxy.requests:
        if faulted and request.method == "GET" and request.range:
            starts.append(int(re.match(r"bytes=(\d+)-", request.range).group(1)))
        faulted = faulted or request.fault is not None
    return starts


@pytest.mark.parametrize("kind", ["500", "503", "slowdown", "drop"])
def test_busy_or_failing_answers_are_retried(
    s3: S3, scan: tuple[str, bytes], tmp_path: Path, kind: str
) -> None:
    url, data = scan
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Fault(kind, path="scan.nii.gz", times=2, methods=("GET", "HEAD")))
        local, _ = fetch_through(proxy, tmp_path, url)
        stats = proxy.stats()
    assert local.read_bytes() == data
    assert stats["failed"] == 2 and stats["retried"] >= 1, stats


@pytest.mark.parametrize("kind", ["reset", "stall"])
def test_a_download_that_breaks_off_mid_object_resumes_where_it_stopped(
    s3: S3, scan: tuple[str, bytes], tmp_path: Path, kind: str
) -> None:
    url, data = scan
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Fault(kind, path="scan.nii.gz", times=2, after_bytes=300_000, stall_s=2.0))
        local, _ = fetch_through(proxy, tmp_path, url)
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(data).digest()
    starts = ranges_after_faults(proxy)
    assert starts and all(0 < start < SIZE for start in starts), proxy.requests  # not from the first byte


def test_more_breaks_than_the_client_retries_are_resumed_by_the_cache(
    s3: S3, scan: tuple[str, bytes], tmp_path: Path
) -> None:
    """s3fs resumes a broken body read 4 times, then gives up; RemoteCache resumes from its partial file."""
    url, data = scan
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Fault("reset", path="scan.nii.gz", times=7, after_bytes=60_000))
        local, cache = fetch_through(proxy, tmp_path, url)
    assert local.read_bytes() == data
    assert cache.retried >= 1 and cache.downloaded == 1
    assert max(ranges_after_faults(proxy)) > 5 * 60_000 // 2  # resumed late in the object, not restarted


def test_a_store_that_keeps_failing_stops_with_one_line_naming_the_object(
    s3: S3, scan: tuple[str, bytes], tmp_path: Path
) -> None:
    url, _ = scan
    fast = {"config_kwargs": {**QUICK["config_kwargs"], "retries": {"max_attempts": 2, "mode": "standard"}}}
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(Fault("503", path="scan.nii.gz", times=1000))
        cache = RemoteCache(tmp_path / "remote", endpoint_url=proxy.url, options=fast, backoff_s=0.05)
        with pytest.raises(RemoteError) as err:
            cache.fetch(url)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{url}: download interrupted"), message
    assert f"tried {cache.attempts} times" in message and "nothing was kept in the cache" in message
    left = [p for p in (tmp_path / "remote").rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert left == []


def test_a_dataset_on_a_flaky_store_is_read_whole(s3: S3, tmp_path: Path) -> None:
    """The data module's own reads (dataset.json, listings, downloads) through the flaky store."""
    local = make_msd_dataset(tmp_path / "ds", num_cases=4)
    url = s3.upload(local, "flaky-dataset", "ds")
    with FaultProxy(s3.endpoint) as proxy:
        proxy.add(
            Fault("503", path="dataset.json", times=2),
            Fault("slowdown", path="imagesTr/case_1", times=2),
            # An image: a reset after more bytes than the object (a 167-byte label) would race the client's read.
            Fault("reset", path="imagesTr/case_2", times=2, after_bytes=500),
            Fault("drop", path="imagesTr/case_3", times=1),
        )
        datamodule = SegDataModule(
            root=url,
            spatial_size=[16, 16, 8],
            num_workers=0,
            cache="none",
            split_path=str(tmp_path / "split.json"),
            remote={"cache_dir": str(tmp_path / "remote"), "endpoint_url": proxy.url, "options": QUICK},
        )
        cases, _, _ = datamodule.catalog.localized_cases()
        stats = proxy.stats()
    assert stats["failed"] == 7 and stats["retried"] >= 4, stats
    for case in cases:
        for key in ("image", "label"):
            relative = Path(case[key]).relative_to(tmp_path / "remote" / "s3" / "flaky-dataset" / "ds")
            original = local / relative.parent.parent / relative.name
            assert Path(case[key]).read_bytes() == original.read_bytes(), relative
