"""Whether a checkpoint belongs to this run's model: the same labels (names and number) and the same network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seglight.core.errors import ConfigError


def check_fits(checkpoint: Mapping[str, Any], module: nn.Module, subject: str) -> None:
    """ConfigError unless ``checkpoint`` was trained for ``module``'s labels and network (names, channels, shapes)."""
    saved = checkpoint.get("hyper_parameters") or {}
    own = getattr(module, "hparams", None) or {}
    saved_labels, own_labels = _label_names(saved), _label_names(own)
    if saved_labels and own_labels and saved_labels != own_labels:
        raise ConfigError(
            f"{subject}: trained for other labels ({_describe_labels(saved_labels)}; this run: "
            f"{_describe_labels(own_labels)}); continue it with the data it was trained on, or start a new run "
            "in another folder"
        )
    saved_out, own_out = _out_channels(saved), _out_channels(own)
    if saved_out is not None and own_out is not None and saved_out != own_out:
        raise ConfigError(
            f"{subject}: trained with {saved_out} output channel(s), this run's network has {own_out}; "
            "continue it with the labels and model options it was trained with (its run folder's "
            ".hydra/config.yaml)"
        )
    mismatch = _state_dict_mismatch(checkpoint["state_dict"], module.state_dict())
    if mismatch:
        saved_net = saved.get("net", {})
        target = saved_net.get("_target_", "another network") if isinstance(saved_net, Mapping) else ""
        raise ConfigError(
            f"{subject}: saved from a different network ({target}; {mismatch}); continue it with the "
            "model options it was trained with (its run folder's .hydra/config.yaml)"
        )


def _label_names(hparams: Mapping[str, Any]) -> dict[int, str]:
    names = hparams.get("label_names") if isinstance(hparams, Mapping) else None
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else {}


def _describe_labels(names: Mapping[int, str]) -> str:
    return ", ".join(f"{value}={name}" for value, name in sorted(names.items()))


def _out_channels(hparams: Mapping[str, Any]) -> int | None:
    net = hparams.get("net") if isinstance(hparams, Mapping) else None
    value = net.get("out_channels") if isinstance(net, Mapping) else None
    return int(value) if isinstance(value, int) else None


def _state_dict_mismatch(saved: Mapping[str, Any], current: Mapping[str, torch.Tensor]) -> str:
    """A short description of how two state dicts differ, or '' if they have the same keys and shapes."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    reshaped = [
        k for k in current if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(current[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k} {list(saved[k].shape)} vs {list(current[k].shape)}"
        )
    return "; ".join(parts)
