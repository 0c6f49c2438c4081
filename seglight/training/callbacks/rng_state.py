"""Exact resume: every random state a run draws from, saved in checkpoints and restored."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from monai.transforms import Compose, Randomizable, Transform
from torch.utils.data import DataLoader

from seglight.data.sampling import uses_seeded_sampling

log = logging.getLogger("seglight")


class RNGState(Callback):
    """Save every random state a training run draws from in each checkpoint, and restore it on resume.

    Lightning restores weights, optimizer, scheduler, scaler and loop counters, but not random states: without
    this callback a resumed run draws other dropout masks than an uninterrupted one. Saved: Python, NumPy and
    torch (CPU and CUDA). seglight's own training loaders need nothing more: their order and augmentation are a
    function of (seed, epoch, rank, position) and their position is saved by Lightning (see
    ``seglight.data.sampling``), so on the CPU a run resumed at any step, with or without loader workers, ends
    with the same weights as one that was never stopped. For other loaders, each MONAI random transform's own
    state is saved too (exact with ``num_workers=0`` at epoch boundaries; workers are reseeded from the
    restored state: reproducible, not identical). On GPUs, cuDNN's and atomics' non-determinism remains.
    """

    def __init__(self) -> None:
        self._fitting: L.Trainer | None = None  # the trainer of the fit under way
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fitting = trainer

    def state_dict(self) -> dict[str, Any]:
        loaders = train_loaders(self._fitting) if self._fitting is not None else []
        return capture_rng_state(loaders)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at train start: building the training DataLoader reseeds torch and the transforms (MONAI),
        # and that happens after checkpoint states are loaded.
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loaders = train_loaders(trainer)
        restore_rng_state(state, loaders)
        for loader in loaders:
            if loader.num_workers == 0:
                # On resume Lightning creates the epoch's loader iterator before this hook; an uninterrupted run
                # creates it after, drawing its base seed from the restored state. Do the same draw here, so the
                # shuffle that follows matches. (Workers hold their own states; those cannot be replayed.)
                iter(loader)


def train_loaders(trainer: L.Trainer) -> list[DataLoader]:
    """The training DataLoaders whose transforms keep their own random state (empty before ``fit`` set them up).

    seglight's loaders re-seed their transforms for every sample, so their states need no saving.
    """
    try:
        loaders = trainer.train_dataloader
    except Exception:
        return []
    return [loader for loader in _flatten_loaders(loaders) if not uses_seeded_sampling(loader)]


def _flatten_loaders(obj: Any) -> Iterator[DataLoader]:
    if isinstance(obj, DataLoader):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _flatten_loaders(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _flatten_loaders(value)


def random_transforms_of(loader: DataLoader) -> list[Randomizable]:
    """Every MONAI random transform the loader's dataset applies, in a fixed order (nested ones included)."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if isinstance(obj, list | tuple):
            for item in obj:
                visit(item)
            return
        if isinstance(obj, Mapping):
            for item in obj.values():
                visit(item)
            return
        if not isinstance(obj, Transform | Compose) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        for value in vars(obj).values():
            visit(value)

    dataset: Any = loader.dataset
    while dataset is not None:  # Subset and other wrappers keep the real dataset in .dataset
        visit(getattr(dataset, "transform", None))
        dataset = getattr(dataset, "dataset", None)
    return found


def capture_rng_state(loaders: list[DataLoader]) -> dict[str, Any]:
    """Python, NumPy, torch (CPU, CUDA) and MONAI transform random states, as plain tensors and numbers.

    Plain types keep checkpoints loadable with ``torch.load(weights_only=True)``, as Lightning loads them.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "transforms": [
            _numpy_state(t.R.get_state()) for loader in loaders for t in random_transforms_of(loader)
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], loaders: list[DataLoader]) -> None:
    """Set the random states that ``capture_rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    transforms = [t for loader in loaders for t in random_transforms_of(loader)]
    saved = state.get("transforms", [])
    if len(saved) != len(transforms):
        log.warning(
            "The checkpoint holds %d random transform states but the training data now has %d random "
            "transforms: augmentations continue from fresh random states.",
            len(saved),
            len(transforms),
        )
        return
    for transform, transform_state in zip(transforms, saved, strict=True):
        transform.R.set_state(_numpy_tuple(transform_state))


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(cached_gaussian),
    }


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["gauss"])
