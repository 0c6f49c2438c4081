"""Training order and augmentation as a function of (seed, epoch, rank, position): shares, blocks, workers, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from seglight.data.sampling import EpochSampler, partition, shard
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
