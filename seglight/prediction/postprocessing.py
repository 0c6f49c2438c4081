"""Post-processing of predicted label maps, as nnU-Net does it: keep only the largest connected component of a
label, for every label or only for those where ``seglight.evaluate`` found that it helps.

``postprocess.largest_component`` (predict) is ``false``, ``true`` (every foreground label), a list of label
values, or the ``postprocessing.json`` that ``python -m seglight.evaluate ... determine_postprocessing=true``
writes: scored on the validation folds with and without, it names the labels whose mean Dice it raised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from seglight.core.errors import ConfigError
from seglight.core.io import atomic_write_text

PLAN_FILE = "postprocessing.json"
OPTION = "postprocess.largest_component"


def largest_component_labels(option: Any, foreground: Sequence[int]) -> list[int]:
    """The label values whose largest connected component alone is kept, from the option's value.

    ``foreground`` is every foreground label value of the model (what ``true`` means); an empty list means off.
    """
    if option is None or option is False:
        return []
    if option is True:
        return [int(v) for v in foreground]
    if isinstance(option, str | Path):
        if str(option).strip().lower() in ("true", "false", "none", "null", ""):
            return largest_component_labels(str(option).strip().lower() == "true", foreground)
        return read_plan(option)
    if isinstance(option, int):
        option = [option]
    if isinstance(option, Sequence):
        labels = [int(v) for v in option]
        unknown = sorted(set(labels) - {int(v) for v in foreground})
        if unknown:
            raise ConfigError(
                f"{OPTION}={labels}: the model has no label {unknown[0]} (its labels: "
                f"{', '.join(map(str, foreground))})"
            )
        return labels
    raise ConfigError(f"{OPTION}={option!r}: expected true, false, a list of label values or a {PLAN_FILE}")


def keep_largest_component(mask: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``mask`` (a 3D label map) with every voxel of ``labels`` outside that label's largest 26-connected
    component set to background; other labels are left alone."""
    if not labels or not np.any(np.isin(mask, labels)):
        return mask
    transform = KeepLargestConnectedComponent(applied_labels=list(labels), is_onehot=False, independent=True)
    kept = transform(torch.as_tensor(mask)[None])[0]
    return np.asarray(kept.cpu().numpy() if hasattr(kept, "cpu") else kept, dtype=mask.dtype)


def write_plan(folder: str | Path, labels: Sequence[int], evidence: Mapping[str, Any]) -> Path:
    """``<folder>/postprocessing.json``: the labels to keep the largest component of, and the Dice behind it."""
    record = {"largest_component": [int(v) for v in labels], **evidence}
    return atomic_write_text(Path(folder) / PLAN_FILE, json.dumps(record, indent=2))


def read_plan(path: str | Path) -> list[int]:
    """The labels a ``postprocessing.json`` (or the folder holding it) names, or a ConfigError naming the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ConfigError(
            f"{OPTION}={path}: no such file (evaluate ... determine_postprocessing=true writes it)"
        )
    try:
        labels = json.loads(path.read_text())["largest_component"]
        return [int(v) for v in labels]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{OPTION}={path}: not a postprocessing plan ({type(exc).__name__}: {exc}); expected "
            '{"largest_component": [label values]}'
        ) from None
