"""Dataset layouts -> a list of cases, each a dict of image and label paths.

Three layouts are read, from a local folder or an ``s3://`` prefix alike:

- MSD: ``dataset.json`` with a ``"training"`` list of ``{"image": ..., "label": ...}`` entries;
- nnU-Net v2 raw: ``imagesTr/{case}_{channel:04d}{file_ending}``, ``labelsTr/{case}{file_ending}`` and a
  ``dataset.json`` with ``channel_names``, ``labels``, ``numTraining`` and ``file_ending``;
- a datalist file: CSV with a header row, or JSON (a list of entries, or ``{"training": [...]}``).

A case's image may be a list of files, one per channel (several modalities); they are stacked as channels.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seglight.data.remote import RemoteCache, is_remote, join_path
from seglight.errors import ConfigError, DataError
from seglight.io import NIFTI_SUFFIXES

Case = dict[str, Any]
IMAGE, LABEL = "image", "label"
LAYOUTS = ("auto", "msd", "nnunet")


def read_dataset_json(root: str | Path, store: RemoteCache | None = None) -> dict[str, Any]:
    """``root/dataset.json`` as a dict, with a message naming the file when it is missing or not JSON."""
    store = store or RemoteCache()
    if not is_remote(root) and not Path(root).expanduser().is_dir():
        raise DataError(f"data.root {root}: no such folder")
    index = join_path(root, "dataset.json")
    if not store.exists(index):
        raise DataError(f"{index}: not found; data.root must hold a dataset.json (MSD or nnU-Net layout)")
    meta = _parse_json(store.read_text(index), index)
    if not isinstance(meta, Mapping):
        raise DataError(f"{index}: is not a JSON object")
    return dict(meta)


def detect_layout(meta: Mapping[str, Any]) -> str:
    """``nnunet`` for an nnU-Net v2 dataset.json (``file_ending``/``channel_names``), else ``msd``."""
    return "nnunet" if "file_ending" in meta or "channel_names" in meta else "msd"


def read_msd_datalist(
    root: str | Path,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    store: RemoteCache | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[Case]:
    """Read ``root/dataset.json`` (Medical Segmentation Decathlon layout) and return its training cases."""
    meta = meta if meta is not None else read_dataset_json(root, store)
    index = join_path(root, "dataset.json")
    if "training" not in meta:
        raise DataError(
            f'{index}: has no "training" list of {{"{_keys(image_key)}": ..., "{label_key}": ...}} entries'
        )
    return resolve_datalist(meta["training"], root, image_key, label_key, source=str(index))


def read_nnunet_datalist(
    root: str | Path, store: RemoteCache | None = None, meta: Mapping[str, Any] | None = None
) -> list[Case]:
    """Read an nnU-Net v2 raw dataset: one image file per channel in ``imagesTr``, labels in ``labelsTr``."""
    store = store or RemoteCache()
    meta = meta if meta is not None else read_dataset_json(root, store)
    index = join_path(root, "dataset.json")
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in meta]
    if missing:
        raise DataError(f"{index}: nnU-Net dataset.json lacks {', '.join(map(repr, missing))}")
    ending = str(meta["file_ending"])
    if ending not in NIFTI_SUFFIXES:
        raise DataError(f"{index}: file_ending {ending!r} is not supported; seglight reads .nii.gz and .nii")
    channels = sorted(int(c) for c in meta["channel_names"])
    if "dataset" in meta:  # nnU-Net's explicit form: {case: {"images": [...], "label": ...}}
        entries = [
            {"case_id": case, IMAGE: spec["images"], LABEL: spec["label"]}
            for case, spec in dict(meta["dataset"]).items()
        ]
        return resolve_datalist(entries, root, source=str(index))
    labels_dir = join_path(root, "labelsTr")
    if not store.exists(labels_dir):
        raise DataError(f"{labels_dir}: not found; an nnU-Net dataset keeps its labels in labelsTr/")
    names = [Path(p).name for p in store.list_files(labels_dir)]
    case_ids = sorted(n[: -len(ending)] for n in names if n.endswith(ending) and not n.startswith("."))
    expected = meta.get("numTraining")
    if expected is not None and int(expected) != len(case_ids):
        raise DataError(
            f"{index}: numTraining is {expected} but {labels_dir} holds {len(case_ids)} label files "
            f"ending in {ending}"
        )
    entries = [
        {
            "case_id": case,
            IMAGE: [f"imagesTr/{case}_{c:04d}{ending}" for c in channels],
            LABEL: f"labelsTr/{case}{ending}",
        }
        for case in case_ids
    ]
    return resolve_datalist(entries, root, source=str(index))


def read_datalist_file(
    path: str | Path,
    root: str | Path | None = None,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    store: RemoteCache | None = None,
) -> tuple[list[Case], dict[str, Any]]:
    """Cases of a CSV or JSON datalist (paths relative to ``root``, else to the file's folder), and its extra keys.

    CSV: a header row naming the columns; ``image_key`` may be a list of columns, one per channel.
    JSON: a list of entries, or an object whose ``"training"`` holds them (MONAI's datalist format), whose
    other keys (``labels``, ``modality``...) are returned alongside.
    """
    store = store or RemoteCache()
    text_path = str(path)
    if not store.exists(text_path):
        raise DataError(f"data.datalist {text_path}: file not found")
    text = store.read_text(text_path)
    base = root if root is not None else _parent(text_path)
    meta: dict[str, Any] = {}
    if text_path.lower().endswith(".csv"):
        rows = [
            {k.strip(): (v or "").strip() for k, v in row.items() if k}
            for row in csv.DictReader(io.StringIO(text))
        ]
        entries: Any = [row for row in rows if any(row.values())]
    elif text_path.lower().endswith(".json"):
        data = _parse_json(text, text_path)
        if isinstance(data, Mapping):
            if "training" not in data:
                raise DataError(f'{text_path}: has no "training" list of entries')
            entries = data["training"]
            meta = {k: v for k, v in data.items() if k != "training"}
        else:
            entries = data
    else:
        raise ConfigError(f"data.datalist {text_path}: must end in .csv or .json")
    return resolve_datalist(entries, base, image_key, label_key, source=text_path), meta


def resolve_datalist(
    entries: Any,
    root: str | Path | None,
    image_key: str | Sequence[str] = "image",
    label_key: str = "label",
    source: str = "data.datalist",
) -> list[Case]:
    """Check a datalist's keys and make its paths absolute (relative paths are taken from ``root``).

    ``image_key`` may name several keys (one file per channel): their files become the case's image list.
    """
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise DataError(f"{source}: the training list is empty or not a list")
    image_keys = [image_key] if isinstance(image_key, str) else list(image_key)
    base = root if root is not None else Path.cwd()
    cases: list[Case] = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DataError(f"{source}: training entry {number} is not a mapping of keys to paths")
        missing = [key for key in (*image_keys, label_key) if key not in entry or entry[key] in ("", None)]
        if missing:
            raise DataError(
                f"{source}: training entry {number} has no {' or '.join(repr(k) for k in missing)} key "
                f"(it has {', '.join(map(repr, entry))}); set data.image_key / data.label_key to match"
            )
        # Inside seglight a case always uses the keys "image" and "label", whatever the datalist calls them.
        case: Case = {k: v for k, v in entry.items() if k not in (*image_keys, label_key)}
        image = entry[image_keys[0]] if len(image_keys) == 1 else [entry[k] for k in image_keys]
        case[IMAGE] = _absolute(image, base)
        case[LABEL] = _absolute(entry[label_key], base)
        case["case_id"] = str(case.get("case_id") or case_id_of(case[IMAGE]))
        cases.append(case)
    return cases


def declared_labels(meta: Mapping[str, Any]) -> dict[int, str]:
    """Label values and names of a dataset.json: MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}``.

    nnU-Net region labels (``{"tumour": [1, 2]}``) name no single value and are left out.
    """
    labels = meta.get("labels")
    if not isinstance(labels, Mapping):
        return {}
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        return {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)}


def declared_label_values(meta: Mapping[str, Any]) -> set[int]:
    """Every label value a dataset.json allows, region labels' values included."""
    values = set(declared_labels(meta))
    for value in (meta.get("labels") or {}).values() if isinstance(meta.get("labels"), Mapping) else ():
        if isinstance(value, Sequence) and not isinstance(value, str):
            values.update(int(v) for v in value)
    return values


def declared_channels(meta: Mapping[str, Any]) -> int | None:
    """Input channels a dataset.json declares (nnU-Net ``channel_names``, MSD ``modality``), if any."""
    for key in ("channel_names", "modality"):
        if isinstance(meta.get(key), Mapping) and meta[key]:
            return len(meta[key])
    return None


def case_id_of(path: str | Sequence[str]) -> str:
    """A case's name from its image path: the file name without .nii/.nii.gz (first channel's, if several)."""
    first = path[0] if isinstance(path, Sequence) and not isinstance(path, str) else path
    name = str(first).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _absolute(path: Any, base: str | Path) -> Any:
    if isinstance(path, Sequence) and not isinstance(path, str):
        return [_absolute(p, base) for p in path]
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return join_path(base, text)


def _parent(path: str) -> str:
    if is_remote(path):
        return path.rsplit("/", 1)[0]
    return str(Path(path).expanduser().resolve().parent)


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source}: not valid JSON ({exc})") from None


def _keys(key: str | Sequence[str]) -> str:
    return key if isinstance(key, str) else "/".join(key)
