"""Config containers as plain Python data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf containers (and mappings, lists and tuples holding them) as plain Python dicts and lists.

    Hyperparameters saved in checkpoints, JSON records and messages then hold builtin types only, whether the
    caller passed a Hydra config node or a dict.
    """
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
