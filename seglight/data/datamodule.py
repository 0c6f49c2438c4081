"""SegDataModule: datalist -> seeded split -> cached datasets -> loaders."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader, Dataset
from omegaconf import DictConfig, ListConfig, OmegaConf

from seglight.data.checks import check_cases_readable
from seglight.data.datalists import IMAGE, LABEL, Case, read_msd_datalist, resolve_datalist
from seglight.data.demo import demo_root, ensure_demo_dataset
from seglight.data.transforms import deterministic_transforms, random_transforms
from seglight.errors import ConfigError
from seglight.utils import atomic_write_text

CACHE_MODES = ("none", "memory")


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks and container limits where the OS exposes them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SegDataModule(L.LightningDataModule):
    """Loads an MSD-style dataset (or the built-in demo), splits it, and serves train/validation batches.

    Args:
        root: folder holding ``dataset.json`` (MSD layout); ignored when ``datalist`` is given.
        datalist: inline list of ``{image_key: path, label_key: path}`` entries, relative to ``root`` or absolute.
        demo: settings of the synthetic demo dataset (see ``seglight.data.demo``); when given, it is generated
            on first use and read from its cache folder like any MSD dataset.
        spatial_size: every volume is resized to this size (x, y, z).
        a_min, a_max: intensity window mapped to [0, 1] (CT: -1000..1000; MRI e.g. 0..255).
        val_fraction: share of cases held out for validation, drawn with ``split_seed``.
        split_path: where the split is written (JSON); an existing split for the same cases is reused.
        cache: ``memory`` runs the deterministic transforms once per case; ``none`` every time.
    """

    def __init__(
        self,
        root: str | None = None,
        datalist: Sequence[Mapping[str, Any]] | None = None,
        demo: Mapping[str, Any] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        spatial_size: Sequence[int] = (128, 128, 64),
        a_min: float = -1000.0,
        a_max: float = 1000.0,
        orientation: str | None = "RAS",
        batch_size: int = 2,
        num_workers: int = 4,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        split_path: str | None = None,
        cache: str = "memory",
    ) -> None:
        super().__init__()
        self.root = root
        self.datalist = _plain(datalist)
        self.demo = _plain(demo)
        self.image_key = image_key
        self.label_key = label_key
        self.spatial_size = [int(s) for s in _plain(spatial_size)]
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.orientation = orientation
        self.batch_size = int(batch_size)
        self.num_workers = max(0, min(int(num_workers), available_cpus()))
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.split_path = split_path
        self.cache = cache
        self._validate_options()
        self.train_cases: list[Case] = []
        self.val_cases: list[Case] = []
        self.train_ds: Dataset | None = None
        self.val_ds: Dataset | None = None

    def _validate_options(self) -> None:
        if self.root is None and self.datalist is None and self.demo is None:
            raise ConfigError(
                "no data given: set data.root=<folder with dataset.json> (data=msd) or use data=demo"
            )
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ConfigError(
                f"data.spatial_size must be three positive sizes (x, y, z), got {self.spatial_size}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.a_max <= self.a_min:
            raise ConfigError(f"data.a_max ({self.a_max}) must be greater than data.a_min ({self.a_min})")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"data.cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")

    # -- where the cases come from -------------------------------------------------------------------------

    @property
    def data_root(self) -> Path | None:
        """The dataset folder: the demo's cache folder, or ``root``."""
        if self.demo is not None:
            return demo_root(**self.demo)
        return Path(self.root).expanduser() if self.root is not None else None

    def prepare_data(self) -> None:
        """Generate the demo dataset on first use (runs once per node)."""
        if self.demo is not None:
            ensure_demo_dataset(**self.demo)

    def read_cases(self) -> list[Case]:
        """All cases of the dataset, with absolute paths."""
        if self.datalist is not None:
            return resolve_datalist(self.datalist, self.data_root, self.image_key, self.label_key)
        return read_msd_datalist(self.data_root, self.image_key, self.label_key)

    @property
    def label_names(self) -> dict[int, str]:
        """Label values and names from dataset.json's ``labels`` (background included), when it has them."""
        root = self.data_root
        index = root / "dataset.json" if root is not None else None
        if index is None or not index.is_file():
            return {}
        labels = json.loads(index.read_text()).get("labels", {})
        if not isinstance(labels, Mapping):
            return {}
        try:  # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}
            return {int(k): str(v) for k, v in labels.items()}
        except (TypeError, ValueError):
            return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}

    # -- split and datasets --------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read and check the cases, split them, and build the datasets."""
        if self.train_ds is not None:
            return
        if self.demo is not None:
            ensure_demo_dataset(**self.demo)  # also for direct use without prepare_data (notebooks, tests)
        cases = self.read_cases()
        check_cases_readable(cases, [IMAGE, LABEL])
        self.train_cases, self.val_cases = self.split(cases)
        self.train_ds = self._dataset(self.train_cases, train=True)
        self.val_ds = self._dataset(self.val_cases, train=False)

    def split(self, cases: list[Case]) -> tuple[list[Case], list[Case]]:
        """Seeded train/validation split, saved to ``split_path``; a saved split of the same cases is reused."""
        if len(cases) < 2:
            raise ConfigError(
                f"the dataset has {len(cases)} case(s); training needs at least 2 (train + validation)"
            )
        by_id = {c["case_id"]: c for c in cases}
        saved = self._saved_split(set(by_id))
        if saved is not None:
            train_ids, val_ids = saved
        else:
            ids = sorted(by_id)
            random.Random(self.split_seed).shuffle(ids)
            n_val = min(len(ids) - 1, max(1, round(len(ids) * self.val_fraction)))
            val_ids, train_ids = sorted(ids[:n_val]), sorted(ids[n_val:])
            if self.split_path:
                record = {
                    "seed": self.split_seed,
                    "val_fraction": self.val_fraction,
                    "train": train_ids,
                    "val": val_ids,
                }
                atomic_write_text(Path(self.split_path), json.dumps(record, indent=2))
        return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]

    def _saved_split(self, ids: set[str]) -> tuple[list[str], list[str]] | None:
        if not self.split_path or not Path(self.split_path).is_file():
            return None
        try:
            record = json.loads(Path(self.split_path).read_text())
            train_ids, val_ids = list(record["train"]), list(record["val"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if set(train_ids) | set(val_ids) != ids:
            return None  # a different dataset: make a new split
        return train_ids, val_ids

    def transforms(self, train: bool) -> mt.Compose:
        """The full pipeline: deterministic prefix, plus the random flip for training."""
        steps = deterministic_transforms(
            IMAGE, LABEL, self.spatial_size, self.a_min, self.a_max, self.orientation
        )
        if train:
            steps += random_transforms(IMAGE, LABEL)
        return mt.Compose(steps)

    def _dataset(self, cases: list[Case], train: bool) -> Dataset:
        transform = self.transforms(train)
        if self.cache == "memory":
            # CacheDataset stores each case's output up to the first random transform.
            return CacheDataset(
                cases, transform, cache_rate=1.0, num_workers=max(1, self.num_workers), progress=False
            )
        return Dataset(cases, transform)

    # -- loaders -------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_ds, shuffle=False, batch_size=1)

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("SegDataModule.setup() must run before the loaders are asked for")
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so hyperparameters and JSON stay simple."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
