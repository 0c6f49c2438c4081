"""The data module's loaders: training batches in a seeded, resumable order, and one validation case per batch.

Cached data leave only the random augmentation per step. Bound for a CUDA device, their batches are assembled
in a background thread while the GPU trains (MONAI's fast-training recipe); on the CPU, where the training step
already keeps every core busy, in the training thread itself. Uncached data use worker processes. Batches bound
for a CUDA device come from page-locked memory. BatchNorm networks never get a last training batch of one case.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from monai.data import DataLoader, Dataset

from seglight.data.caching.device import training_device
from seglight.data.prefetch import ThreadLoader
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


def assemble_in_thread(trainer: Any) -> bool:
    """Whether batches of cached data are assembled in a background thread: only when bound for a CUDA device.

    There the training thread mostly queues work for the GPU and the CPU has cores to spare. On the CPU the step's
    operations already use every core, so a second thread gains nothing and takes cores from them (measured on
    2 cores: about 100 ms of CPU per 1 s step, most of it the waking of MONAI's polling thread); assembling a cached
    batch in the training thread instead costs its flip and collation, about 2 ms.
    """
    return training_device(trainer) is not None


def train_loader(
    dataset: Dataset,
    batch_size: int,
    length: int,
    seed: int,
    rank: int,
    num_workers: int,
    cached: bool,
    in_thread: bool,
    drop_last: bool,
    pin_memory: bool,
) -> DataLoader:
    """One rank's training batches: its share of the cases in a seeded order, resumable mid-epoch.

    ``cached``: batches of cached data, assembled in a background thread with ``in_thread``
    (``assemble_in_thread``), else in the training thread; uncached data use ``num_workers`` worker processes.
    """
    keep_batch_memory_mapped()  # page faults on every new batch and step would otherwise cost 5 % of a CPU step
    return training_loader(
        dataset,
        batch_size=batch_size,
        length=length,
        seed=seed,
        rank=rank,
        num_workers=0 if cached else num_workers,
        threaded=cached and in_thread,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


def val_loader(
    dataset: Dataset,
    length: int,
    seed: int,
    num_workers: int,
    cached: bool,
    in_thread: bool,
    pin_memory: bool,
) -> DataLoader:
    """One rank's block of validation cases, one per batch, padded to ``length`` so all ranks take as many steps.

    Cached cases are served as training batches are (``train_loader``); uncached ones by ``num_workers`` workers.
    """
    shard = ValidationShard(dataset, length)
    # Its own generator: creating the loader or an iterator never draws from torch's global random state.
    generator = torch.Generator().manual_seed(seed % 2**63)
    options = dict(batch_size=1, shuffle=False, generator=generator, pin_memory=pin_memory)
    if cached and in_thread:
        return ThreadLoader(shard, **options)
    workers = 0 if cached else num_workers
    return DataLoader(shard, num_workers=workers, persistent_workers=workers > 0, **options)


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


def keep_batch_memory_mapped(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc reuse the memory that each training step and batch frees instead of mapping fresh pages for them.

    By default glibc serves each allocation of a few MB (a flipped volume, a collated batch, a layer's
    activations) with a new ``mmap`` and returns it on free, and gives the heap's free top back to the system once
    it exceeds twice that: every step then page-faults and zeroes its working set again. Serving allocations up to
    ``mmap_threshold`` (glibc's upper limit) from the heap and keeping up to ``trim_threshold`` of freed memory
    mapped avoids it: measured on the demo (SegResNet, batch 2 of 64x64x32, 2 CPU cores), 25,000 page faults and
    about 45 ms of CPU per step with a 64 MB threshold, 700 faults and 8 ms with 1 GB. The memory kept is what the
    steps use again at once. Process-wide and done once; Linux with glibc only; ``SEGLIGHT_MALLOC_TUNING=0`` turns
    it off. Returns whether the settings were applied.
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
