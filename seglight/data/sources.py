"""One data source (a dataset folder, a datalist, or subject folders) -> its cases, by the layout options.

Training reads its training source and, when one is given, its validation source through ``read_source`` with the
same options, so both are read alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglight.core.errors import DataError
from seglight.data.datalists import (
    Case,
    detect_layout,
    read_datalist_file,
    read_dataset_json,
    read_msd_datalist,
    read_nnunet_datalist,
    resolve_datalist,
)
from seglight.data.folders import (
    DEFAULT_IMAGE_PATTERN,
    DEFAULT_LABEL_PATTERN,
    IncompleteCase,
    read_folder_cases,
)
from seglight.data.remote import RemoteCache


@dataclass
class SourceCases:
    """The cases of one source, its dataset.json (or datalist keys), and case folders that cannot be used."""

    cases: list[Case]
    meta: dict[str, Any] = field(default_factory=dict)
    incomplete: list[IncompleteCase] = field(default_factory=list)


def read_source(
    root: str | Path | None,
    datalist: str | Sequence[Mapping[str, Any]] | None = None,
    layout: str = "auto",
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    image_pattern: str | Sequence[str] = DEFAULT_IMAGE_PATTERN,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    store: RemoteCache | None = None,
    others: Sequence[Case] = (),
) -> SourceCases:
    """The cases of a datalist (file or inline, paths relative to ``root``), or of the dataset at ``root``.

    ``layout``: ``auto`` reads dataset.json and tells MSD from nnU-Net by its keys; ``msd``, ``nnunet``; ``folder``
    finds subject folders under ``root`` by ``image_pattern`` and ``label_pattern``. ``others``: the cases of
    another source of the same dataset (the training cases, when reading a validation source), so that cases
    named by their paths are named alike in both.
    """
    store = store or RemoteCache()
    if isinstance(datalist, str):
        cases, meta = read_datalist_file(datalist, root, image_key, label_key, store, others)
        return SourceCases(cases, meta)
    if datalist is not None:
        cases = resolve_datalist(datalist, root, image_key, label_key, others=others)
        return SourceCases(cases, meta_beside(root, store))
    if root is None:
        raise DataError("no data given: set data.root (or data.datalist)")
    if layout == "folder":
        found = read_folder_cases(root, image_pattern, label_pattern, store)
        return SourceCases(found.cases, meta_beside(root, store), found.incomplete)
    meta = read_dataset_json(root, store)
    if (detect_layout(meta) if layout == "auto" else layout) == "nnunet":
        return SourceCases(read_nnunet_datalist(root, store, meta), meta)
    return SourceCases(read_msd_datalist(root, image_key, label_key, store, meta, others), meta)


def meta_beside(root: str | Path | None, store: RemoteCache | None = None) -> dict[str, Any]:
    """``root/dataset.json`` when there is one (labels and channel names for a datalist or subject folders)."""
    if root is None:
        return {}
    try:
        return read_dataset_json(root, store)
    except DataError:
        return {}
