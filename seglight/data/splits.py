"""Seeded train/validation splits: a hold-out share, or k folds saved in nnU-Net's ``splits.json`` format; the
run's ``split.json`` records which cases trained and which validated.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from seglight.core.errors import ConfigError
from seglight.core.io import atomic_write_text
from seglight.data.datalists import Case
from seglight.data.settings import SplitSettings

Fold = dict[str, list[str]]


def split_cases(
    cases: list[Case],
    settings: SplitSettings,
    val_ids: set[str] | None = None,
    val_source: str | None = None,
    write: bool = True,
) -> tuple[list[Case], list[Case]]:
    """(training cases, validation cases), recorded in ``settings.split_path`` when ``write``.

    ``val_ids``: the cases of a validation source of its own (``val_source``), which validate while all others
    train: no split is drawn. Otherwise, with ``fold`` set, that fold of the k-fold partition in ``splits_path``
    (made once, then reused, so every fold of a study shares it); else ``val_fraction`` of the cases held out,
    or the split saved at ``split_path`` when it was made for the same cases.
    """
    by_id = {case["case_id"]: case for case in cases}  # unique: the readers see to it
    if val_ids is not None:
        train_ids = sorted(i for i in by_id if i not in val_ids)
        record: dict[str, Any] = {"val_source": val_source}
        return _record(record, train_ids, sorted(i for i in by_id if i in val_ids), by_id, settings, write)
    if len(by_id) < 2:
        raise ConfigError(
            f"the dataset has {len(by_id)} case(s); training needs at least 2 (train + validation)"
        )
    record = {"seed": settings.split_seed}
    if settings.fold is not None:
        folds = load_or_create_folds(
            settings.splits_path, set(by_id), settings.num_folds, settings.split_seed
        )
        train_ids, held_out = folds[settings.fold]["train"], folds[settings.fold]["val"]
        record.update(fold=settings.fold, num_folds=settings.num_folds, splits_path=settings.splits_path)
    else:
        saved = saved_split(settings.split_path, set(by_id))
        train_ids, held_out = (
            saved if saved is not None else holdout_split(by_id, settings.val_fraction, settings.split_seed)
        )
        record.update(val_fraction=settings.val_fraction)
    return _record(record, train_ids, held_out, by_id, settings, write)


def saved_split(path: str | None, ids: set[str]) -> tuple[list[str], list[str]] | None:
    """The hold-out split saved at ``path`` when it was made for exactly these cases, else None."""
    if not path or not Path(path).is_file():
        return None
    try:
        record = json.loads(Path(path).read_text())
        train_ids, val_ids = list(record["train"]), list(record["val"])
        if record.get("fold") is not None:
            return None  # a fold's split: the hold-out split is made afresh
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if set(train_ids) | set(val_ids) != ids:
        return None  # a different dataset: make a new split
    return train_ids, val_ids


def _record(
    record: dict[str, Any],
    train_ids: list[str],
    val_ids: list[str],
    by_id: dict[str, Case],
    settings: SplitSettings,
    write: bool,
) -> tuple[list[Case], list[Case]]:
    if settings.split_path and write:
        record.update(train=list(train_ids), val=list(val_ids))
        atomic_write_text(Path(settings.split_path), json.dumps(record, indent=2))
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


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
