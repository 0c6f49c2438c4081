"""Fixtures shared by the tests. Plain helper functions live in ``tests/helpers.py``.

Every test runs against a private seglight cache (``SEGLIGHT_CACHE_DIR``, inherited by the subprocesses the
tests start), never the user's ``~/.cache/seglight``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import S3, SECRET, free_port

AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AWS_ENV += ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's private seglight cache, set for every test and every process a test starts."""
    path = tmp_path_factory.mktemp("seglight-cache")
    saved = os.environ.get("SEGLIGHT_CACHE_DIR")
    os.environ["SEGLIGHT_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("SEGLIGHT_CACHE_DIR", None)
    else:
        os.environ["SEGLIGHT_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """A moto S3 server on a free loopback port, with the AWS environment pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    for key in AWS_ENV:
        os.environ.pop(key, None)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="seglight-test-key",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield S3(endpoint, boto3.client("s3", endpoint_url=endpoint))
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mounts size-limited file systems (tmpfs of ``size`` bytes) for a test, and unmounts them afterwards.

    Mounting needs root (or the mount capability): elsewhere the test is skipped, saying so.
    """
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"small-disk-{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: cannot set up a size-limited file system")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A finished tiny run (2 epochs, last.ckpt refreshed every 2 steps): checkpoints to resume, damage, predict."""
    from seglight.train import train
    from tests.helpers import tiny_config

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run_dir, "callbacks.preemption.every_n_train_steps=2"))
    return run_dir
