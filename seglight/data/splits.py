"""Seeded train/validation splits: a hold-out share, or k folds saved in nnU-Net's ``splits.json`` format."""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path

from seglight.core.errors import ConfigError
from seglight.core.io import atomic_write_text

Fold = dict[str, list[str]]


def holdout_split(ids: Collection[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) case ids: a seeded shuffle, ``val_fraction`` of the cases (at least one) held out."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def kfold_partition(ids: Collection[str], num_folds: int, seed: int) -> list[Fold]:
    """``num_folds`` folds of a seeded shuffle; fold k validates on its share and trains on the others."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    shares = [sorted(order[k::num_folds]) for k in range(num_folds)]
    return [
        {"train": sorted(i for j, share in enumerate(shares) if j != k for i in share), "val": shares[k]}
        for k in range(num_folds)
    ]


def load_or_create_folds(
    path: str | Path | None, ids: Collection[str], num_folds: int, seed: int
) -> list[Fold]:
    """The k-fold partition saved at ``path`` (nnU-Net format, a list of folds), made and saved if absent.

    A saved partition is reused as it is, so every fold of a study trains on the same partition; one made for
    other cases or another number of folds is an error rather than silently replaced.
    """
    ids = set(ids)
    if num_folds < 2:
        raise ConfigError(f"data.num_folds must be at least 2, got {num_folds}")
    if len(ids) < num_folds:
        raise ConfigError(
            f"data.num_folds={num_folds} needs at least {num_folds} cases; the dataset has {len(ids)}"
        )
    if path is not None and Path(path).is_file():
        folds = _read_folds(Path(path))
        saved_ids = set().union(*(set(f["train"]) | set(f["val"]) for f in folds)) if folds else set()
        if len(folds) != num_folds:
            raise ConfigError(
                f"{path} holds {len(folds)} folds but data.num_folds is {num_folds}; set data.num_folds to "
                "match, or point data.splits_path at a new file"
            )
        if saved_ids != ids:
            added, gone = sorted(ids - saved_ids), sorted(saved_ids - ids)
            raise ConfigError(
                f"{path} was made for other cases ({len(added)} new: {_some(added)}; {len(gone)} missing: "
                f"{_some(gone)}); delete it for a new partition, or point data.splits_path elsewhere"
            )
        return folds
    folds = kfold_partition(ids, num_folds, seed)
    if path is not None:
        atomic_write_text(Path(path), json.dumps(folds, indent=2))
    return folds


def _read_folds(path: Path) -> list[Fold]:
    try:
        folds = json.loads(path.read_text())
        return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f'{path}: not a splits file (a JSON list of {{"train": [...], "val": [...]}} folds): {exc}'
        ) from None


def _some(ids: Sequence[str], limit: int = 3) -> str:
    if not ids:
        return "none"
    return ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "")
