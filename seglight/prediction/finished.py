"""Masks a rerun may keep: a prediction stopped part-way (a kill, a full disk) is completed, not redone.

Masks are written atomically, so a file under a final name is always whole. Each mask carries a fingerprint of
what produced it in its NIfTI header's ``descrip`` field: the model files (path, size, modification time), the
prediction options, and the input files of its case. A rerun into the same output folder keeps a mask whose
fingerprint matches (and, with ``save_probabilities``, whose probabilities are there too) and predicts the rest;
any other file of that name (another model, other options, a changed scan, another tool's mask) is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from seglight.core.io import load_nifti

STAMP_PREFIX = "seglight:"


def model_fingerprint(model_names: Sequence[str], options: Mapping[str, Any]) -> str | None:
    """What a set of models and prediction options produce, as a short hash; None for a model held only in memory.

    A checkpoint counts by its path, size and modification time: a file retrained in place is a new model.
    """
    files = []
    for name in model_names:
        path = Path(name)
        if not path.is_file():
            return None  # a module in memory: nothing on disk says what it was
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps([files, dict(options)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_stamp(fingerprint: str | None, image: str | Sequence[str]) -> str | None:
    """The stamp of one case's mask: the models' fingerprint and the case's input files (path, size, time)."""
    if fingerprint is None:
        return None
    files = []
    for item in [image] if isinstance(image, str) else list(image):
        try:
            stat = os.stat(item)
            files.append([str(Path(item).resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(item)])
    digest = hashlib.sha256(json.dumps([fingerprint, files]).encode()).hexdigest()[:24]
    return f"{STAMP_PREFIX}{digest}"


def stamp(image: nib.Nifti1Image, value: str | None) -> nib.Nifti1Image:
    """``image`` with ``value`` in its header's description field (80 bytes at most), when there is one."""
    if value is not None:
        image.header["descrip"] = value.encode("ascii")
    return image


def is_finished(mask: Path, value: str | None, also: Sequence[Path] = ()) -> bool:
    """Whether ``mask`` was written by the prediction that ``value`` stamps (and the files ``also`` exist)."""
    if value is None or not mask.is_file() or not all(Path(p).is_file() for p in also):
        return False
    try:
        found = load_nifti(mask).header["descrip"].item()
    except Exception:  # not a NIfTI file we can read: predict it again
        return False
    return (found.decode("ascii", "replace") if isinstance(found, bytes) else str(found)) == value
