"""Segment scans with a trained model: ``python -m seglight.predict ckpt=<file> input=<...> output=<folder>``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from seglight.console import setup as setup_console
from seglight.errors import ConfigError, reported_errors
from seglight.inference import PredictionReport, predict


def run(cfg: DictConfig) -> PredictionReport:
    """Predict every input of ``cfg`` (see conf/predict.yaml); raises DataError naming any input that failed."""
    for key in ("ckpt", "input"):
        if not cfg.get(key):
            raise ConfigError(f"{key}= is required, e.g. {_EXAMPLE}")
    roi = OmegaConf.to_container(cfg.roi) if cfg.get("roi") is not None else None
    report = predict(
        ckpt=cfg.ckpt,
        input=cfg.input,
        output=cfg.output,
        roi=roi,
        overlap=cfg.overlap,
        sw_batch_size=cfg.sw_batch_size,
        tta=cfg.tta,
        save_probabilities=cfg.save_probabilities,
        device=cfg.device,
        amp=cfg.amp,
        datalist_key=cfg.get("datalist_key"),
        cache_dir=cfg.paths.cache_dir,
        endpoint_url=cfg.get("endpoint_url"),
    )
    print(f"Wrote {len(report.written)} mask(s) to {report.output}", flush=True)
    report.raise_for_failures()
    return report


_EXAMPLE = "python -m seglight.predict ckpt=<run>/checkpoints/last.ckpt input=<scan.nii.gz or folder> output=<folder>"


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.predict"):
        run(cfg)


if __name__ == "__main__":
    main()
