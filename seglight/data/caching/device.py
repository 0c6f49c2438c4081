"""The training cache on the GPU: preprocessed cases moved there once, then flipped and batched where the network
runs, so no training batch crosses the PCIe bus (MONAI's fast-training recipe: CacheDataset + ToDeviced).

``data.cache=gpu`` asks for it; ``data.cache=auto`` (the default) takes it when the trainer trains on a CUDA device
and the training cache fits in ``data.gpu_cache_share`` of that device's free memory, measured before the model is
placed; otherwise the cache stays in host memory and batches are copied from pinned memory without blocking. Each
process (each DDP rank) decides for its own device and holds its own copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from monai.data import Dataset

from seglight.core.errors import ConfigError
from seglight.data.caching.datasets import nbytes

log = logging.getLogger("seglight")

GPU_CACHE_MODES = ("gpu", "auto")
# Above this share of the free memory even an explicit data.cache=gpu is refused: training needs the rest.
GPU_CACHE_LIMIT = 0.9


def training_device(trainer: Any) -> torch.device | None:
    """The CUDA device ``trainer`` trains on, or None (no trainer yet, or training on the CPU)."""
    try:
        device = trainer.strategy.root_device if trainer is not None else None
    except Exception:  # a trainer that is not set up yet
        return None
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (the driver's count: other processes' use is excluded)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def use_gpu_cache(
    mode: str, size: int, device: torch.device | None, share: float, free: int | None = None
) -> bool:
    """Whether a training cache of ``size`` bytes goes on ``device``; ``mode`` is ``gpu`` or ``auto``.

    ``auto`` takes the GPU when the cache fits in ``share`` of its free memory and says which it chose; ``gpu``
    takes it unless it would leave training too little (a ConfigError), warns above ``share``, and falls back to
    host memory with a warning when training runs on the CPU. ``free`` defaults to the device's free memory.
    """
    if device is None:
        if mode == "gpu":
            log.warning(
                "data.cache=gpu: training does not run on a CUDA GPU, so the cache stays in host memory"
            )
        return False
    free = free_gpu_memory(device) if free is None else int(free)
    fits = size <= share * free
    if mode == "auto":
        log.info(
            "Training cache: %.2f GB, %s (data.gpu_cache_share=%.2f of %.1f GB free on %s)",
            size / 1e9,
            "on the GPU" if fits else "in host memory: larger than",
            share,
            free / 1e9,
            device,
        )
        return fits
    if size > GPU_CACHE_LIMIT * free:
        raise ConfigError(
            f"data.cache=gpu: the training cache takes {size / 1e9:.2f} GB but {device} has {free / 1e9:.2f} GB "
            "free, which training needs too; use data.cache=memory (or auto, which chooses)"
        )
    if not fits:
        log.warning(
            "data.cache=gpu: the training cache takes %.2f GB, more than data.gpu_cache_share=%.2f of the %.1f GB "
            "free on %s; training may run out of GPU memory (data.cache=memory keeps it in host memory)",
            size / 1e9,
            share,
            free / 1e9,
            device,
        )
    return True


def move_to_device(dataset: Dataset, device: torch.device) -> Dataset:
    """The in-memory cached dataset with its tensors moved to ``device``, one case at a time (in place)."""
    dataset.data = [_to(item, device) for item in dataset.data]
    return dataset


def dataset_bytes(dataset: Dataset) -> int:
    """Bytes of the tensors an in-memory dataset holds."""
    return sum(nbytes(item) for item in dataset.data)


def _to(item: Any, device: torch.device) -> Any:
    if isinstance(item, torch.Tensor):
        return item.to(device)
    if isinstance(item, Mapping):
        return {key: _to(value, device) for key, value in item.items()}
    if isinstance(item, list | tuple):
        return type(item)(_to(value, device) for value in item)
    return item
