"""The data module's loaders: training batches in a seeded, resumable order, and one validation case per batch.

Cached data leave only the random augmentation per step, so their batches are assembled in a background thread
(MONAI's fast-training recipe); uncached data use worker processes. Batches bound for a CUDA device come from
page-locked memory. BatchNorm networks never get a last training batch of one case.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader

from seglight.data.caching.device import training_device
from seglight.data.sampling import ValidationShard, training_loader

log = logging.getLogger("seglight")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks and container limits where the OS exposes them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def train_loader(
    dataset: Dataset,
    batch_size: int,
    length: int,
    seed: int,
    rank: int,
    num_workers: int,
    threaded: bool,
    drop_last: bool,
    pin_memory: bool,
) -> DataLoader:
    """One rank's training batches: its share of the cases in a seeded order, resumable mid-epoch.

    ``threaded``: batches of cached data, assembled in a thread; otherwise ``num_workers`` worker processes.
    """
    if threaded:
        keep_batch_memory_mapped()  # page faults on every new batch would otherwise dominate the step
    return training_loader(
        dataset,
        batch_size=batch_size,
        length=length,
        seed=seed,
        rank=rank,
        num_workers=num_workers,
        threaded=threaded,
        drop_last=drop_last,
        **loader_options(threaded, pin_memory),
    )


def val_loader(
    dataset: Dataset, length: int, seed: int, num_workers: int, threaded: bool, pin_memory: bool
) -> DataLoader:
    """One rank's block of validation cases, one per batch, padded to ``length`` so all ranks take as many steps."""
    shard = ValidationShard(dataset, length)
    # Its own generator: creating the loader or an iterator never draws from torch's global random state.
    generator = torch.Generator().manual_seed(seed % 2**63)
    if threaded:
        return ThreadDataLoader(
            shard, batch_size=1, shuffle=False, generator=generator, **loader_options(True, pin_memory)
        )
    return DataLoader(
        shard,
        batch_size=1,
        shuffle=False,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **loader_options(False, pin_memory),
    )


def loader_options(threaded: bool, pin_memory: bool) -> dict[str, Any]:
    """DataLoader arguments: pinned memory, and for a threaded loader how often its queue is polled."""
    if threaded:
        # Cached data: only the random augmentation is left per step, and a background thread assembles
        # batches faster than worker processes, which would copy every batch through shared memory (MONAI's
        # fast-training recipe). The thread's queue is polled every buffer_timeout seconds, which is also how
        # late the end of an epoch is noticed: MONAI's 10 ms default would add 10 ms to every epoch.
        return {"buffer_timeout": 0.001, "pin_memory": pin_memory}
    return {"pin_memory": pin_memory}


def pin_memory(trainer: Any, on_gpu: bool) -> bool:
    """Whether batches come from page-locked memory: when bound for a CUDA device and not already there."""
    return training_device(trainer) is not None and not on_gpu


# Said once when a BatchNorm network's training cases leave a last batch of one (it is dropped each epoch).
DROPPED_BATCH_NOTICE = (
    "The network has BatchNorm and %d training cases leave a last batch of one: it is dropped each epoch "
    "(data.batch_size=%d)"
)


def last_batch_of_one(per_rank: int, batch_size: int, samples_per_case: int) -> bool:
    """Whether an epoch of ``per_rank`` cases in batches of ``batch_size`` ends with a batch of one case.

    BatchNorm cannot normalise one case at a 1x1x1 feature map (small inputs reach one); dropping that batch
    costs one case per epoch, a different one each epoch as the order is shuffled. Cases that bring several
    patches each never make a batch of one sample.
    """
    if samples_per_case > 1:
        return False
    return batch_size > 1 and per_rank > batch_size and per_rank % batch_size == 1


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
