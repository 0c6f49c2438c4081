"""Training order and augmentation as a function of (seed, epoch, rank, position): shares, blocks, workers, resume."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from seglight.core.errors import DataError
from seglight.data.prefetch import ThreadLoader
from seglight.data.sampling import (
    EpochSampler,
    ResumableDataLoader,
    ResumableThreadDataLoader,
    partition,
    shard,
    training_loader,
)
from tests.helpers import tiny_config


def test_shares_and_blocks_cover_every_case_once() -> None:
    shares = partition(11, 3, seed=5)
    assert sorted(i for share in shares for i in share) == list(range(11))
    assert sorted(len(share) for share in shares) == [3, 4, 4]
    assert partition(11, 3, seed=5) == shares and partition(11, 3, seed=6) != shares
    assert [list(shard(5, 2, rank)) for rank in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [len(shard(2, 3, rank)) for rank in range(3)] == [1, 1, 0]


def test_epoch_order_depends_on_seed_epoch_and_rank_only() -> None:
    sampler = EpochSampler(5, length=6, seed=1, rank=0)
    first = sampler.epoch_order(0)
    assert len(first) == len(sampler) == 6 and {i for i, _ in first} == set(range(5))  # padded with a repeat
    assert EpochSampler(5, length=6, seed=1, rank=0).epoch_order(0) == first
    for other in (sampler.epoch_order(1), EpochSampler(5, 6, seed=1, rank=1).epoch_order(0)):
        assert [s for _, s in other] != [s for _, s in first]
    sampler.set_epoch(1)
    sampler.start = 4
    assert list(sampler) == sampler.epoch_order(1)[4:]


def batches(loader) -> list[dict]:
    return [{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} for batch in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    cfg = tiny_config(tmp_path_factory.mktemp("sampling"), "data.cache=none", "data.num_workers=2")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    return dm


def test_augmentation_is_the_same_with_zero_or_two_workers(datamodule) -> None:
    datamodule.num_workers = 2
    two = datamodule.train_dataloader()
    datamodule.num_workers = 0
    none = datamodule.train_dataloader()
    assert (two.num_workers, none.num_workers) == (2, 0)
    epoch0 = batches(two)
    assert same(epoch0, batches(none))  # MONAI's worker seeding does not change a single voxel
    two.sampler.set_epoch(1)
    none.sampler.set_epoch(1)
    epoch1 = batches(two)
    assert same(epoch1, batches(none)) and not same(epoch0, epoch1)


def test_a_loader_continues_an_epoch_from_its_saved_state(datamodule) -> None:
    datamodule.num_workers = 0
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(3)
    everything = batches(loader)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (3, datamodule.batch_size)
    again = datamodule.train_dataloader()
    again.load_state_dict(state)
    again.sampler.set_epoch(3)
    assert same(batches(again), everything[1:])
    assert same(batches(again), everything)  # the saved position applies to that one epoch, once


def test_cached_batches_are_the_same_in_the_training_thread_or_a_background_thread(
    tmp_path: Path, cache_dir: Path
) -> None:
    cfg = tiny_config(tmp_path, "data.cache=memory")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    inline = dm.train_dataloader()  # no trainer on a CUDA device: assembled in this thread, no worker
    assert type(inline) is ResumableDataLoader and inline.num_workers == 0
    threaded = training_loader(
        dm.train_ds, 2, inline.sampler.length, dm.settings.seed, threaded=True, drop_last=inline.drop_last
    )
    assert isinstance(threaded, ResumableThreadDataLoader)
    for epoch in (0, 1):
        inline.sampler.set_epoch(epoch)
        threaded.sampler.set_epoch(epoch)
        assert same(batches(threaded), batches(inline))


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "seglight-batches"]


def test_a_background_thread_sleeps_while_its_batch_waits_and_stops_with_the_iterator() -> None:
    loader = ThreadLoader(list(range(10)), batch_size=2)
    iterator = iter(loader)
    assert next(iterator).tolist() == [0, 1]
    (thread,) = batch_threads()
    time.sleep(0.05)  # the next batch is ready and waits for room
    status = Path(f"/proc/self/task/{thread.native_id}/status")
    if status.is_file():  # Linux: count how often the thread woke while it waited (MONAI's polled every 1 ms)
        before = _wakeups(status)
        time.sleep(0.3)
        assert _wakeups(status) - before <= 2
    iterator.close()  # as when an epoch is cut short
    assert not thread.is_alive() and not batch_threads()
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def _wakeups(status: Path) -> int:
    line = next(ln for ln in status.read_text().splitlines() if ln.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


class Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 2:
            raise DataError("case 2: unreadable")
        return torch.tensor(index)


def test_an_error_while_assembling_a_batch_is_raised_in_the_training_thread() -> None:
    got = []
    with pytest.raises(DataError, match="case 2"):
        for batch in ThreadLoader(Broken(), batch_size=1):
            got.append(int(batch))
    assert got == [0, 1] and not batch_threads()  # not an epoch that silently ends early
