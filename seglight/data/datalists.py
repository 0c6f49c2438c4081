"""Dataset layouts on disk -> a list of cases, each a dict of image and label paths."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seglight.errors import DataError

Case = dict[str, Any]
IMAGE, LABEL = "image", "label"


def read_msd_datalist(root: str | Path, image_key: str = "image", label_key: str = "label") -> list[Case]:
    """Read ``root/dataset.json`` (Medical Segmentation Decathlon layout) and return its training cases."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root}: no such folder")
    index = root / "dataset.json"
    if not index.is_file():
        raise DataError(f"{index}: not found; data.root must hold an MSD-style dataset.json")
    try:
        meta = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{index}: not valid JSON ({exc})") from None
    if not isinstance(meta, Mapping) or "training" not in meta:
        raise DataError(
            f'{index}: has no "training" list of {{"{image_key}": ..., "{label_key}": ...}} entries'
        )
    return resolve_datalist(meta["training"], root, image_key, label_key, source=str(index))


def resolve_datalist(
    entries: Any,
    root: str | Path | None,
    image_key: str = "image",
    label_key: str = "label",
    source: str = "data.datalist",
) -> list[Case]:
    """Check a datalist's keys and make its paths absolute (relative paths are taken from ``root``)."""
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise DataError(f"{source}: the training list is empty or not a list")
    base = Path(root).expanduser() if root is not None else Path.cwd()
    cases: list[Case] = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"{source}: training entry {number} is not a mapping of keys to paths")
        missing = [key for key in (image_key, label_key) if key not in entry]
        if missing:
            raise DataError(
                f"{source}: training entry {number} has no {' or '.join(repr(k) for k in missing)} key "
                f"(it has {', '.join(map(repr, entry))}); set data.image_key / data.label_key to match"
            )
        # Inside seglight a case always uses the keys "image" and "label", whatever the datalist calls them.
        case: Case = {k: v for k, v in entry.items() if k not in (image_key, label_key)}
        case[IMAGE] = _absolute(entry[image_key], base)
        case[LABEL] = _absolute(entry[label_key], base)
        case.setdefault("case_id", case_id_of(case[IMAGE]))
        cases.append(case)
    return cases


def case_id_of(path: str | Sequence[str]) -> str:
    """A case's name from its image path: the file name without .nii/.nii.gz (first channel's, if several)."""
    first = path[0] if isinstance(path, Sequence) and not isinstance(path, str) else path
    name = Path(str(first)).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _absolute(path: Any, base: Path) -> Any:
    if isinstance(path, Sequence) and not isinstance(path, str):
        return [_absolute(p, base) for p in path]
    text = str(path)
    if "://" in text:  # URLs are resolved by the remote layer, not here
        return text
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())
