"""Lightning's model summary as one log line."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger("seglight")


class ModelSummary(LightningModelSummary):
    """Lightning's model summary as one log line; FLOPs only when Lightning could measure them (it needs the
    module's ``example_input_array``, which a network sized from the data has not)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        parts = [
            f"{name} {kind} {params.strip()}"
            for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"], strict=True)
        ]
        frozen = total_parameters - trainable_parameters
        line = (
            f"Model summary: {', '.join(parts)}; {_count(trainable_parameters)} trainable, "
            f"{_count(frozen)} frozen parameters ({model_size:.1f} MB)"
        )
        if total_flops:
            line += f", {_count(total_flops)} FLOPs per forward pass"
        log.info(line)


def _count(number: int) -> str:
    return get_human_readable_count(int(number)).strip()
