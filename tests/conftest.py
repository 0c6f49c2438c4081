"""Fixtures shared by the tests. Plain helper functions live in ``tests/helpers.py``.

Every test runs against a private seglight cache (``SEGLIGHT_CACHE_DIR``, inherited by the subprocesses the
tests start), never the user's ``~/.cache/seglight``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
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
