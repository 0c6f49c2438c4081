"""Small helpers shared across layers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf containers (and mappings, lists and tuples holding them) as plain Python dicts and lists.

    Hyperparameters saved in checkpoints, JSON records and messages then hold builtin types only, whether the
    caller passed a Hydra config node or a dict.
    """
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


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
