"""Small helpers shared across layers."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    # Created as open() creates files (0666 less the umask), not mkstemp's 0600: others may need to read it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def keep_batch_memory_mapped(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Let glibc reuse the memory of freed batches instead of mapping fresh pages for every new one.

    By default glibc serves each allocation of a few MB (a flipped volume, a collated batch) with a new
    ``mmap`` and returns it on free, so every batch page-faults and zeroes its memory again: measured, that is
    most of a cached loader's time per step. Serving allocations up to ``mmap_threshold`` from the heap and
    keeping up to ``trim_threshold`` of freed memory mapped avoids it. Process-wide and done once; Linux with
    glibc only; ``SEGLIGHT_MALLOC_TUNING=0`` turns it off. Returns whether the settings were applied.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get("SEGLIGHT_MALLOC_TUNING", "1") == "0" or not hasattr(os, "confstr"):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
        )
    except (OSError, ValueError, AttributeError):
        return False
    return _malloc_tuned
