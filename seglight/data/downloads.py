"""Downloads that ride out a flaky store: a try that breaks off on a transient error (a reset or stalled connection,
500/503/``SlowDown``) is resumed, after a backoff, from the bytes already downloaded, with Range requests.

Used by ``seglight.data.remote.RemoteCache.fetch`` on top of the clients' own retries (botocore's for each request,
s3fs's for a broken body read), for what gets through them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from seglight.core.errors import first_line
from seglight.core.io import is_disk_full

log = logging.getLogger("seglight")

RESUME_CHUNK = 8 * 2**20  # a resumed download asks for the rest of the object in ranges of this size
MAX_BACKOFF_S = 30.0
# What a busy or failing store answers: worth another try.
TRANSIENT_ANSWERS = (
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "reduce your request rate",
    "(500)",
    "(503)",
)
TRANSIENT_ANSWERS += ("Service Unavailable", "Internal Server Error", "RequestTimeout", "Please try again")
# Names of the exceptions clients raise for a connection that failed, broke off or timed out.
CONNECTION_MARKERS = (
    "Connect",
    "Connection",
    "Endpoint",
    "Timeout",
    "Payload",
    "IncompleteRead",
    "Disconnected",
)


class GaveUp(Exception):
    """A download that still failed at its last try; the last error is its ``__cause__``."""

    def __init__(self, tries: int) -> None:
        super().__init__(f"failed {tries} times")
        self.tries = tries


def download_resuming(
    fs: Any,
    rpath: str,
    tmp: Path,
    size: int | None,
    callback: Any,
    attempts: int,
    backoff_s: float,
    name: str,
) -> int:
    """Download ``rpath`` into ``tmp`` in up to ``attempts`` tries; returns the tries it took.

    A try that fails on a transient error is followed, after ``backoff_s`` (doubling, at most 30 s), by one that
    resumes from the bytes already in ``tmp``. An error that another try would not mend raises as it is at the
    first try; after more than one try, ``GaveUp`` (``from`` the last error).
    """
    tries = 1
    while True:
        try:
            if tries == 1:
                fs.get_file(rpath, str(tmp), callback=callback)
            else:
                resume_into(fs, rpath, tmp, size, callback)
            return tries
        except Exception as exc:
            if tries >= attempts or not is_transient(exc):
                if tries > 1:
                    raise GaveUp(tries) from exc
                raise
            if not _in_order(fs, size):
                tmp.unlink(missing_ok=True)  # written in parallel parts, with holes: start again
            wait = min(backoff_s * 2 ** (tries - 1), MAX_BACKOFF_S)
            got = tmp.stat().st_size if tmp.exists() else 0
            log.warning(
                "%s: download broke off at %d of %s bytes (%s); resuming in %.1f s (try %d of %d)",
                name,
                got,
                size if size is not None else "?",
                first_line(exc),
                wait,
                tries + 1,
                attempts,
            )
            time.sleep(wait)
            tries += 1


def resume_into(fs: Any, rpath: str, tmp: Path, size: int | None, callback: Any) -> None:
    """Append the rest of the object to ``tmp`` with Range requests, from the bytes already there."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    with open(tmp, "ab") as handle:
        if size is None:
            handle.write(fs.cat_file(rpath, start=offset or None))
            return
        while offset < size:
            data = fs.cat_file(rpath, start=offset, end=min(offset + RESUME_CHUNK, size))
            if not data:
                break
            handle.write(data)
            handle.flush()  # what arrived counts for the next try, should this one break too
            offset += len(data)
            callback.relative_update(len(data))


def is_transient(exc: BaseException) -> bool:
    """Whether a failed download may succeed when tried again: a broken or stalled connection, a busy store."""
    if is_disk_full(exc):
        return False
    chain = exception_chain(exc)
    if any(isinstance(e, FileNotFoundError | PermissionError) for e in chain):
        return False
    names = {type(e).__name__ for e in chain}
    if connection_error(names) or names & {"ClientOSError", "ServerDisconnectedError", "ResponseParserError"}:
        return True
    text = " ".join(str(e) for e in chain)
    return any(marker in text for marker in TRANSIENT_ANSWERS)


def connection_error(names: set[str]) -> bool:
    """Whether these exception class names include a failed, broken or timed-out connection."""
    return any(marker in name for name in names for marker in CONNECTION_MARKERS)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (cause, else context), each once."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _in_order(fs: Any, size: int | None) -> bool:
    """Whether a broken ``get_file`` leaves the object's first bytes in order (s3fs fetches large ones in parallel)."""
    parallel = int(getattr(fs, "max_concurrency", 1) or 1) > 1
    block = getattr(fs, "default_block_size", None)
    return not (parallel and block and size and size > block)
