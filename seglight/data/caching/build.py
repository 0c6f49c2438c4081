"""A data module's datasets: its pipeline run ahead and kept as ``data.cache`` says (``none``, ``memory``, ``disk``;
``gpu``/``auto`` fill host memory first and move the training cache to the GPU when it goes there), and the caches
pruned to ``data.cache_max_gb`` afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai import transforms as mt
from monai.data import Dataset

from seglight.data.bad_cases import warn_empty_labels
from seglight.data.caching.datasets import MemoryCacheDataset, cached_dataset
from seglight.data.caching.device import (
    GPU_CACHE_MODES,
    dataset_bytes,
    move_to_device,
    training_device,
    use_gpu_cache,
)
from seglight.data.caching.files import GB, format_size, hold, prune
from seglight.data.datalists import IMAGE, LABEL, Case
from seglight.data.settings import CacheSettings, DataSettings
from seglight.data.transforms import deterministic_transforms, random_transforms

log = logging.getLogger("seglight")


def pipeline(settings: DataSettings, train: bool) -> mt.Compose:
    """The full pipeline: the deterministic transforms, plus for training the random ones (flips, patches)."""
    patch = settings.patch
    steps = deterministic_transforms(
        IMAGE,
        LABEL,
        settings.spatial_size,
        settings.a_min,
        settings.a_max,
        settings.orientation,
        mode=patch.mode,
        target_spacing=patch.target_spacing,
        normalize=settings.normalization.normalize,
        intensity=settings.normalization.intensity,
    )
    if train:
        steps += random_transforms(
            IMAGE,
            LABEL,
            mode=patch.mode,
            patch_size=patch.size,
            num_samples=patch.num_samples,
            pos_neg_ratio=patch.pos_neg_ratio,
            class_ratios=patch.class_ratios,
            background_in_body=settings.normalization.normalize == "window",  # air is 0 once windowed
        )
    return mt.Compose(steps)


def build_dataset(
    cases: list[Case],
    train: bool,
    settings: DataSettings,
    check: Callable[[Case], None],
    names: dict[str, str],
    workers: int,
    on_bad: Callable[[Any, str], None] | None = None,
    trainer: Any = None,
) -> tuple[Dataset, dict[str, str]]:
    """The dataset of ``cases`` (deterministic part kept per ``data.cache``), and the cases that failed to
    preprocess (case id -> problem, downloaded files named by their URLs).

    ``check`` runs on each case before it is preprocessed (``names``: the URL of each downloaded file). With
    ``data.cache=none`` training cases are checked when a loader worker first reads them (``on_bad`` then
    reports them, or they raise), validation cases now, so that every validation (and the best checkpoint) is
    measured on the same cases.
    """
    cache = settings.cache
    if cache.mode == "disk":
        hold(cache.preprocessed_dir)  # pruning keeps the entries this run reads
    # The GPU modes fill the cache in host memory first; the training cases then move to the GPU if they go.
    store = "memory" if cache.mode in GPU_CACHE_MODES else cache.mode
    dataset, failures = cached_dataset(
        cases,
        pipeline(settings, train),
        store,
        cache.preprocessed_dir,
        workers=max(1, workers),
        verify=check,
        keep_meta=not train,  # training steps need no affine or header; validation metrics need spacing
        verify_on_read=train,
        on_bad=on_bad,
    )
    failed = {}
    for index, message in failures.items():
        for local, url in names.items():
            message = message.replace(local, url)
        failed[cases[index]["case_id"]] = message
    if isinstance(dataset, MemoryCacheDataset):
        warn_empty_labels([case for i, case in enumerate(cases) if i not in failures], dataset.data)
    if train and cache.mode in GPU_CACHE_MODES:
        device = training_device(trainer)
        if use_gpu_cache(cache.mode, dataset_bytes(dataset), device, cache.gpu_cache_share):
            assert device is not None
            dataset = move_to_device(dataset, device)
    return dataset, failed


def on_gpu(dataset: Dataset | None) -> bool:
    """Whether an in-memory dataset's cases live on a GPU."""
    data = getattr(dataset, "data", None)
    first = data[0] if data else None
    return isinstance(first, Mapping) and any(
        isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in first.values()
    )


def limit_caches(cache: CacheSettings, remote_dir: Any, dicom_dir: Any) -> None:
    """Prune the disk, remote-file and DICOM caches to ``data.cache_max_gb``, least recently used first."""
    if cache.cache_max_gb is None:
        return
    limit = int(cache.cache_max_gb * GB)
    roots = {"preprocessed": cache.preprocessed_dir, "remote": remote_dir, "dicom": dicom_dir}
    result = prune(roots, limit)
    if result.removed:
        log.info(
            "Caches over data.cache_max_gb=%g: removed %d least recently used entries (%s), %s kept",
            cache.cache_max_gb,
            result.removed,
            format_size(result.removed_bytes),
            format_size(result.kept_bytes),
        )
    if result.kept_bytes > limit:
        log.warning(
            "Caches hold %s, over data.cache_max_gb=%g: %s of it is in use by this or another running run "
            "and is kept until it ends",
            format_size(result.kept_bytes),
            cache.cache_max_gb,
            format_size(result.in_use_bytes),
        )
