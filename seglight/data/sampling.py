"""Which sample each process, loader worker and step sees, and how a resumed run gets back to it.

Training: every process (rank) draws from its own fixed, seeded share of the training cases (``partition``), so
it caches and reads only those. Each epoch, ``EpochSampler`` orders the share as a pure function of (seed,
epoch, rank) and pairs every position with a seed of its own; ``SeededAugmentation`` re-seeds the random
transforms from it just before applying them. An augmentation therefore depends only on (seed, epoch, rank,
position): the same with 0 or N loader workers (MONAI's worker seeding is overridden for every sample), different
on each rank, reproducible, and a run resumed in the middle of an epoch only skips the positions already
trained on (``ResumableLoader`` keeps that position in the checkpoint, through Lightning's stateful loaders).

Validation: each rank scores one contiguous block of the validation cases (``shard``), so the blocks gathered in
rank order are the cases in their order and every case is scored exactly once. Ranks with a smaller block get
placeholder batches (``PADDING``) so that all ranks run the same number of steps; they are never scored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Randomizable
from torch.utils.data import Dataset, Sampler

from seglight.data.prefetch import ThreadLoader

log = logging.getLogger("seglight")

# Key of a validation placeholder item: present only in batches that pad a rank's shard (see ValidationShard).
PADDING = "padding"
# Streams of random numbers, so the partition and the epoch orders never share draws.
_PARTITION, _EPOCH = 0, 1
_MAX_SEED = 2**31 - 1


def _entropy(*parts: int) -> list[int]:
    return [int(p) % 2**32 for p in parts]


def partition(num_items: int, world_size: int, seed: int) -> list[list[int]]:
    """A fixed seeded partition of ``range(num_items)`` into ``world_size`` shares whose sizes differ by at most 1.

    Each share is sorted, so a rank's cache holds its cases in datalist order.
    """
    order = np.random.default_rng(_entropy(seed, _PARTITION)).permutation(num_items)
    return [sorted(int(i) for i in order[rank::world_size]) for rank in range(world_size)]


def shard(num_items: int, world_size: int, rank: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(num_items)``: the first ``num_items % world_size`` get one more."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def distributed_ranks(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of the trainer's processes; (0, 1) without a trainer."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (just ``[obj]`` outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class EpochSampler(Sampler):
    """Training order of one rank: ``(index, sample seed)`` pairs, a pure function of (seed, epoch, rank).

    Each epoch yields ``length`` positions: a permutation of the rank's ``num_items`` items, extended with the
    start of further permutations when ``length`` is larger (ranks with a smaller share pad up to the common
    length, so every rank runs the same number of steps). ``start`` skips the first positions of the epoch (set
    by ``ResumableLoader`` when a run resumes mid-epoch); the length stays that of the whole epoch.
    """

    def __init__(self, num_items: int, length: int | None = None, seed: int = 0, rank: int = 0) -> None:
        if num_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        self.num_items = int(num_items)
        self.length = int(length if length is not None else num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every training epoch."""
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """Every position of ``epoch``: (item index, seed of that sample's augmentation)."""
        rng = np.random.default_rng(_entropy(self.seed, _EPOCH, epoch, self.rank))
        order: list[int] = []
        while len(order) < self.length:
            order.extend(int(i) for i in rng.permutation(self.num_items))
        seeds = rng.integers(0, _MAX_SEED, size=self.length)
        return [(index, int(s)) for index, s in zip(order[: self.length], seeds, strict=True)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from self.epoch_order(self.epoch)[self.start :]

    def __len__(self) -> int:
        return self.length

    def identity(self) -> dict[str, int]:
        """What the order depends on besides the epoch: a saved position means nothing if any of it changed."""
        return {"seed": self.seed, "rank_items": self.num_items, "length": self.length}


class SeededAugmentation(Dataset):
    """``dataset[(index, seed)]``: re-seeds the dataset's random transforms from ``seed``, then returns item ``index``.

    Works for any MONAI dataset whose ``transform`` runs the random steps (``Dataset``, ``PersistentDataset``,
    seglight's memory cache). Plain indices pass through unchanged.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=int(seed))
        return self.dataset[int(index)]


class ValidationShard(Dataset):
    """A rank's block of validation cases, padded with placeholder items up to ``length``.

    Placeholders are ``{PADDING: True, "case_id": ""}``: the module skips them, so nothing is scored twice, while
    every rank runs the same number of validation steps.
    """

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset = dataset
        self.length = max(int(length), len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if index < len(self.dataset):
            return self.dataset[index]
        return {PADDING: True, "case_id": ""}


def is_placeholder(batch: Any) -> bool:
    """Whether a validation batch is a placeholder that only evens out the processes' steps (nothing to score)."""
    return isinstance(batch, Mapping) and PADDING in batch


class _Resumable:
    """A DataLoader over an ``EpochSampler`` that can continue an epoch where a checkpoint left it.

    ``state_dict`` (saved by Lightning's fit loop with the checkpoint) holds the epoch and how many sampler
    positions the training steps have consumed; ``load_state_dict`` makes the next iteration of that epoch skip
    them. Iterators are created lazily, at the first batch, after Lightning has set the epoch: a resumed run
    then starts its workers and threads on the right epoch and position.
    """

    sampler: EpochSampler
    batch_size: int | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        start = self._take_resume_position()
        self.sampler.start = start
        self._position = start
        step = int(self.batch_size or 1)
        for batch in super().__iter__():  # type: ignore[misc]
            # Counted as the batch is handed over: Lightning's fetcher does not read ahead when the length is known.
            self._position = min(self._position + step, len(self.sampler))
            yield batch

    def _take_resume_position(self) -> int:
        resume, self._resume = self._resume, None
        if resume is None or int(resume.get("epoch", -1)) != self.sampler.epoch:
            return 0
        position = int(resume.get("position", 0))
        saved = {k: resume.get(k) for k in self.sampler.identity()}
        if saved != self.sampler.identity():
            log.warning(
                "Resuming in the middle of epoch %d with other data settings than the checkpoint's (%s, now %s): "
                "the rest of the epoch follows the new order.",
                self.sampler.epoch,
                saved,
                self.sampler.identity(),
            )
        return min(max(position, 0), len(self.sampler))

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the sampler positions consumed in it (Lightning saves this in checkpoints)."""
        return {"epoch": self.sampler.epoch, "position": self._position, **self.sampler.identity()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the saved epoch after its consumed positions (Lightning calls this on a mid-epoch resume)."""
        self._resume = dict(state_dict)


class ResumableDataLoader(_Resumable, DataLoader):
    """MONAI's DataLoader (worker processes) that resumes mid-epoch; see ``_Resumable``."""


class ResumableThreadDataLoader(_Resumable, ThreadLoader):
    """A ``ThreadLoader`` (batches assembled in a background thread) that resumes mid-epoch; see ``_Resumable``."""


def training_loader(
    dataset: Dataset,
    batch_size: int,
    length: int,
    seed: int,
    rank: int = 0,
    num_workers: int = 0,
    threaded: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """The training DataLoader of one rank: seeded order and augmentation, resumable mid-epoch.

    ``threaded`` assembles batches in a background thread (for cached data, where only the augmentation is left);
    otherwise ``num_workers`` worker processes. The loader draws its workers' base seed from its own generator,
    never from torch's global one, so creating an iterator does not shift the random stream of dropout.
    """
    sampler = EpochSampler(len(dataset), length=length, seed=seed, rank=rank)
    generator = torch.Generator().manual_seed(int(seed) % 2**63)
    seeded = SeededAugmentation(dataset)
    if threaded:
        return ResumableThreadDataLoader(
            seeded, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs
        )
    return ResumableDataLoader(
        seeded,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def uses_seeded_sampling(loader: Any) -> bool:
    """Whether ``loader`` is one of seglight's training loaders (order and augmentation seeded per sample)."""
    return isinstance(loader, _Resumable)
