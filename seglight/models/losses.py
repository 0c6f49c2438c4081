"""Loss configs: the default, and the activation each task needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_LOSS = {"_target_": "monai.losses.DiceLoss", "sigmoid": True}


def loss_for_task(loss: Mapping[str, Any], softmax: bool) -> dict[str, Any]:
    """The loss config with the activation the task needs (MONAI Dice-family losses; others are left alone).

    Binary: ``sigmoid`` on the single output channel. Multi-class: ``softmax`` over the channels and
    ``to_onehot_y`` so that a label map of values 0..C-1 is the target.
    """
    cfg = dict(loss)
    if not ({"sigmoid", "softmax"} & set(cfg)):
        return cfg
    for key in ("sigmoid", "softmax", "to_onehot_y"):
        cfg.pop(key, None)
    if softmax:
        cfg.update(softmax=True, to_onehot_y=True)
    else:
        cfg.update(sigmoid=True)
    return cfg
