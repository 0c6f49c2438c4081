"""Score predicted masks against ground truth: ``python -m seglight.evaluate pred=<folder> gt=<folder or dataset>``."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from seglight.core.console import setup as setup_console
from seglight.core.containers import plain
from seglight.core.errors import ConfigError, reported_errors
from seglight.evaluation.scoring import Evaluation, evaluate
from seglight.prediction.postprocessing import PLAN_FILE


def check_options(cfg: DictConfig) -> None:
    """``pred=`` and ``gt=`` are given."""
    for key in ("pred", "gt"):
        if cfg.get(key) in (None, "", []):
            raise ConfigError(
                f"{key}= is required, e.g. python -m seglight.evaluate pred=<folder> gt=<folder>"
            )


def run(cfg: DictConfig) -> Evaluation:
    """Evaluate as conf/evaluate.yaml describes, print the summary and return it."""
    check_options(cfg)
    pred = plain(cfg.pred)
    labels = plain(cfg.get("labels"))
    if labels is not None and not isinstance(labels, list):
        labels = [labels]
    output = Path(cfg.output or (pred if isinstance(pred, str) else pred[0]))
    evaluation = evaluate(
        pred,
        cfg.gt,
        output=output,
        labels=labels,
        label_key=cfg.label_key,
        determine_postprocessing=cfg.get("determine_postprocessing", False),
        # How a datalist or subject folders name their cases, as the data options of the same names in training.
        **{
            key: plain(cfg[key])
            for key in ("image_key", "image_pattern", "label_pattern")
            if cfg.get(key) is not None
        },
    )
    print(evaluation.describe(), flush=True)
    print(f"Per-case metrics: {output / 'metrics.csv'}", flush=True)
    if evaluation.postprocessing is not None:
        print(
            f"Post-processing plan: {output / PLAN_FILE} (seglight.predict ... "
            f"postprocess.largest_component={output / PLAN_FILE})",
            flush=True,
        )
    return evaluation


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.evaluate"):
        run(cfg)


if __name__ == "__main__":
    main()
