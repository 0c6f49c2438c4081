"""Run the deterministic part of the pipeline once per case, and keep its output in memory or on disk.

``memory``: every case is preprocessed when the data module is set up and kept in RAM; only the random
augmentation runs per step. ``disk``: the same, stored with MONAI's ``PersistentDataset`` under a key made of the
case's files (path, size, modification time) and a signature of the deterministic transforms with their settings,
so the cache persists across runs and is invalidated when either changes. Both report every case that fails to
preprocess (with its file) instead of stopping at the first one, so a run can refuse to start, or skip them.
``none``: nothing is kept; every access runs the whole pipeline, and each case is checked when a process first
reads it (``FirstReadDataset``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai import transforms as mt
from monai.data import Dataset, MetaTensor, PersistentDataset
from monai.transforms import RandomizableTrait, Transform, apply_transform
from monai.utils import convert_to_tensor

from seglight.core.errors import ConfigError, DataError, DiskFullError, find_user_error
from seglight.core.io import atomic_path
from seglight.data.caching.files import record_use
from seglight.data.remote import cache_usage
from seglight.data.transforms import describe_transform

log = logging.getLogger("seglight")

CACHE_MODES = ("none", "memory", "disk")
CACHE_FORMAT = 1  # bump when what is stored changes, so older entries are not reused


def split_pipeline(pipeline: mt.Compose) -> tuple[mt.Compose, mt.Compose]:
    """The deterministic prefix (up to the first random transform) and the random rest, as MONAI caches do."""
    first_random = pipeline.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    steps = list(pipeline.transforms)
    cut = len(steps) if first_random is None else first_random
    return mt.Compose(steps[:cut]), mt.Compose(steps[cut:])


def pipeline_signature(pipeline: mt.Compose, *checks: Any) -> str:
    """A hash of the transforms' classes and settings (``describe_transform``, which also describes them in an
    exported model's JSON) and MONAI's version: changes when the output would.

    ``checks`` (their public settings) are part of it too: an entry exists only for a case that passed them.
    """
    description = [
        CACHE_FORMAT,
        monai.__version__,
        describe_transform(list(pipeline.transforms)),
        describe_transform(checks),
    ]
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CacheKey:
    """``PersistentDataset`` key of a case: its files' path, size and modification time, plus the pipeline."""

    def __init__(self, signature: str) -> None:
        self.signature = signature

    def __call__(self, item: Mapping[str, Any]) -> bytes:
        parts = []
        for key in sorted(item):
            for value in item[key] if isinstance(item[key], list | tuple) else [item[key]]:
                if isinstance(value, str) and os.path.isfile(value):
                    stat = os.stat(value)
                    parts.append([key, value, stat.st_size, stat.st_mtime_ns])
                elif isinstance(value, str | int | float | bool) or value is None:
                    parts.append([key, value])
        digest = hashlib.sha256(json.dumps([self.signature, parts]).encode()).hexdigest()
        return digest.encode()


class DiskCacheDataset(PersistentDataset):
    """``PersistentDataset`` whose entries are written next to their final name and renamed into place.

    MONAI writes the temporary file into the system temp folder, often another filesystem, which turns the
    final move into a copy that a killed run can leave half-written; a damaged entry is recomputed here.
    With ``keep_meta=False`` items lose their metadata after loading (training needs none).
    """

    def __init__(self, *args: Any, keep_meta: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_meta = keep_meta

    def _transform(self, index: int) -> Any:
        item = self._cachecheck(self.data[index])
        if self.keep_meta:
            return self._post_transform(item)
        return without_meta(self._post_transform(without_meta(item)))

    def _cache_file(self, item: Mapping[str, Any]) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{self.hash_func(item).decode('utf-8')}.pt"

    def ensure_cached(self, item: Mapping[str, Any], verify: Callable[[Any], None] | None = None) -> bool:
        """Compute and store ``item``'s entry unless it exists (``verify`` runs first); True when computed now."""
        entry = self._cache_file(item)
        if entry.is_file():
            record_use(entry)
            return False
        if verify is not None:
            verify(item)
        self._compute_and_store(item)
        return True

    def _cachecheck(self, item_transformed: Any) -> Any:
        hashfile = self._cache_file(item_transformed)
        if hashfile.is_file():
            try:
                item = torch.load(hashfile, weights_only=self.weights_only)
                record_use(hashfile)
                return item
            except FileNotFoundError:  # removed since (python -m seglight.cache clear): recompute it
                log.info("Preprocessed cache entry %s was removed: recomputing it", hashfile)
            except Exception as exc:  # truncated or unreadable entry: recompute it
                log.warning("Preprocessed cache entry %s is damaged (%s): recomputing it", hashfile, exc)
                hashfile.unlink(missing_ok=True)
        return self._compute_and_store(item_transformed)

    def _compute_and_store(self, item: Any) -> Any:
        hashfile = self._cache_file(item)
        result = self._pre_transform(deepcopy(item))
        try:
            # Not durable: a lost entry is recomputed, and syncing every entry would slow filling the cache.
            # Through a Python file, so a full disk surfaces as the OS error (a DiskFullError naming the folder).
            with atomic_path(hashfile, durable=False, size_hint=nbytes(result)) as tmp, open(tmp, "wb") as f:
                torch.save(convert_to_tensor(result, convert_numeric=False, track_meta=self.track_meta), f)
        except OSError as exc:  # a read-only cache costs speed, not the run
            log.warning("Cannot write the preprocessed cache entry %s (%s)", hashfile, exc)
        return result


class MemoryCacheDataset(Dataset):
    """Preprocessed cases held in memory; each access applies the random transforms to one of them.

    Items with metadata are deep-copied first: MONAI's random transforms record themselves in a MetaTensor's
    list of applied operations, which would otherwise grow in the cache. Plain tensors are not copied, as
    MONAI's transforms return new tensors rather than write into their input (what ``copy_cache=False``
    assumes in ``CacheDataset``), which keeps the per-step cost to the augmentation itself.
    """

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        if self.transform is None:
            return item
        has_meta = any(isinstance(v, MetaTensor) for v in item.values())
        result = apply_transform(self.transform, deepcopy(item) if has_meta else dict(item))
        return result if has_meta else without_meta(result)


class FirstReadDataset(Dataset):
    """Runs the whole pipeline on every access (``data.cache=none``); checks each case when first read.

    ``verify`` runs once per case in each process (the DataLoader worker or thread that reads it first). A case
    that fails raises its DataError, or, when ``on_bad`` is given (training under ``data.on_bad_case=skip``),
    is reported to ``on_bad(case, message)`` and replaced from then on by the next good case, so an epoch keeps
    its length and its order.
    """

    def __init__(
        self,
        data: Sequence[Any],
        transform: Callable[[Any], Any] | None = None,
        verify: Callable[[Any], None] | None = None,
        on_bad: Callable[[Any, str], None] | None = None,
    ) -> None:
        super().__init__(list(data), transform)
        self.verify = verify
        self.on_bad = on_bad
        self._verified: set[int] = set()
        self._bad: set[int] = set()

    def _transform(self, index: int) -> Any:
        count = len(self.data)
        for step in range(count):
            candidate = (index + step) % count
            if candidate in self._bad:
                continue
            try:
                return self._read(candidate)
            except Exception as exc:
                user_error = find_user_error(exc)
                if user_error is None:
                    raise  # a bug, not a bad file: keep the traceback
                if self.on_bad is None:
                    raise user_error from None
                self._bad.add(candidate)
                self.on_bad(self.data[candidate], str(user_error))
        raise DataError(f"none of the {count} cases could be read (each was reported above)")

    def _read(self, index: int) -> Any:
        item = self.data[index]
        if index not in self._verified:
            if self.verify is not None:
                self.verify(item)
            self._verified.add(index)
        return apply_transform(self.transform, item) if self.transform is not None else item


def without_meta(item: Any) -> Any:
    """``item`` (or a list of them) with MetaTensors as plain tensors (same storage): what a training step needs.

    MONAI's transforms track each operation on a MetaTensor, and collating that record for every sample costs
    as much as the augmentation itself.
    """
    if isinstance(item, list):
        return [without_meta(i) for i in item]
    if isinstance(item, Mapping):
        return {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in item.items()}
    return item


def preprocess(
    cases: Sequence[Any], fn: Callable[[Any], Any], workers: int = 1
) -> tuple[list[Any], dict[int, str]]:
    """``fn`` on every case in a thread pool: results, and the user-facing problem of each case that failed."""
    results: list[Any] = [None] * len(cases)
    failures: dict[int, str] = {}

    def one(index: int) -> None:
        try:
            results[index] = fn(cases[index])
        except Exception as exc:
            user_error = find_user_error(exc)
            if user_error is None or isinstance(user_error, DiskFullError):
                raise  # a bug, or a full disk (every case would fail): not a bad file
            failures[index] = str(user_error)

    with _one_torch_thread_each(workers):
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            for future in [pool.submit(one, i) for i in range(len(cases))]:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure or a signal, start no more cases
    return results, failures


@contextmanager
def _one_torch_thread_each(workers: int) -> Iterator[None]:
    """Cases run in parallel threads: each torch op on one thread, or the threads oversubscribe the cores."""
    previous = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cached_dataset(
    cases: Sequence[Mapping[str, Any]],
    pipeline: mt.Compose,
    mode: str,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    verify: Callable[[Any], None] | None = None,
    keep_meta: bool = True,
    verify_on_read: bool = False,
    on_bad: Callable[[Any, str], None] | None = None,
) -> tuple[Dataset, dict[int, str]]:
    """A dataset that runs ``pipeline``'s deterministic part once per case (``mode``), and the failed cases.

    The returned dataset holds only the cases that preprocessed; failures maps the others' indices to their
    problem. ``verify`` runs on each case before it is preprocessed (and raises for a bad one). Without
    ``keep_meta`` the cached items are plain tensors, which makes each step's copy and collation cheaper
    (validation keeps the metadata: its metrics need the voxel spacing). With ``none`` nothing runs ahead and
    every access runs the whole pipeline; ``verify`` runs now on every case, or with ``verify_on_read`` when a
    process first reads the case (bad cases then go to ``on_bad``, or raise; see ``FirstReadDataset``).
    """
    if mode == "none":
        if verify_on_read:
            return FirstReadDataset(cases, pipeline, verify=verify, on_bad=on_bad), {}
        failures = {}
        if verify is not None:
            _, failures = preprocess(cases, verify, workers)
        kept = [case for i, case in enumerate(cases) if i not in failures]
        return FirstReadDataset(kept, pipeline), failures
    deterministic, random = split_pipeline(pipeline)
    if mode == "memory":

        def verified(case: Any) -> Any:
            if verify is not None:
                verify(case)
            return deterministic(case)

        # The first case alone, to tell a cache that will not fit in memory before it fills the memory.
        first, first_failure = preprocess(cases[:1], verified, 1)
        if first and first[0] is not None:
            _check_memory_fits(nbytes(first[0]) * len(cases), len(cases))
        items, failures = preprocess(cases[1:], verified, workers)
        items = first + items
        failures = {**first_failure, **{i + 1: m for i, m in failures.items()}}
        kept = [
            item if keep_meta else without_meta(item) for i, item in enumerate(items) if i not in failures
        ]
        log.info(
            "Preprocessed cache: %d cases in memory (%.1f MB)", len(kept), sum(nbytes(i) for i in kept) / 1e6
        )
        return MemoryCacheDataset(kept, random if random.transforms else None), failures
    if mode != "disk":
        raise ValueError(f"unknown cache mode {mode!r}")
    folder = Path(cache_dir) if cache_dir is not None else None
    key = CacheKey(pipeline_signature(deterministic, verify))
    options = dict(cache_dir=folder, hash_func=key, weights_only=False, keep_meta=keep_meta)
    dataset = DiskCacheDataset(list(cases), pipeline, **options)
    computed, failures = preprocess(cases, lambda case: dataset.ensure_cached(case, verify), workers)
    if failures:
        kept_cases = [c for i, c in enumerate(cases) if i not in failures]
        dataset = DiskCacheDataset(kept_cases, pipeline, **options)
    fresh = sum(1 for c in computed if c)
    log.info(
        "Preprocessed cache: %d of %d cases computed now, the rest reused; %s",
        fresh,
        len(cases) - len(failures),
        cache_usage(folder) if folder is not None else "not kept",
    )
    return dataset, failures


def nbytes(item: Any) -> int:
    """Bytes of the tensors and arrays in ``item`` (a dict, list or tensor)."""
    if isinstance(item, torch.Tensor):
        return item.element_size() * item.nelement()
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, Mapping):
        return sum(nbytes(v) for v in item.values())
    if isinstance(item, list | tuple):
        return sum(nbytes(v) for v in item)
    return 0


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory_fits(estimate: int, cases: int) -> None:
    available = available_memory()
    if available is None:
        return
    if estimate > 0.8 * available:
        raise ConfigError(
            f"data.cache=memory: the {cases} preprocessed cases would take about {estimate / 1e9:.1f} GB of the "
            f"{available / 1e9:.1f} GB available; use data.cache=disk (kept in data.cache_dir instead)"
        )
    if estimate > 0.5 * available:
        log.warning(
            "data.cache=memory: the preprocessed cases will take about %.1f GB of %.1f GB available; "
            "data.cache=disk keeps them on disk instead",
            estimate / 1e9,
            available / 1e9,
        )
