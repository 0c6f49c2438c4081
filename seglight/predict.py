"""Segment scans with a trained model or an ensemble: ``python -m seglight.predict ckpt=<...> input=<...> output=<folder>``."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from seglight.core.console import setup as setup_console
from seglight.core.containers import plain
from seglight.core.errors import ConfigError, DataError, reported_errors
from seglight.data.remote import is_remote
from seglight.prediction.cases import PredictionReport, output_formats, predict
from seglight.training.checkpoints import model_checkpoints

_EXAMPLE = "python -m seglight.predict ckpt=<run>/checkpoints/last.ckpt input=<scan.nii.gz or folder> output=<folder>"


def check_options(cfg: DictConfig) -> None:
    """What must hold before anything is written: ``ckpt=`` and ``input=`` given, the checkpoints found, a local
    input present, the output formats known."""
    for key in ("ckpt", "input"):
        if cfg.get(key) in (None, "", []):
            raise ConfigError(f"{key}= is required, e.g. {_EXAMPLE}")
    output_formats(plain(cfg.get("output_format", "nifti")))
    model_checkpoints(plain(cfg.ckpt))
    source = str(cfg.input)
    if not is_remote(source) and not Path(source).expanduser().exists():
        raise DataError(f"input={source}: no such file or folder")


def run(cfg: DictConfig) -> PredictionReport:
    """Predict every input of ``cfg`` (see conf/predict.yaml); raises DataError naming any input that failed."""
    check_options(cfg)
    report = predict(
        ckpt=plain(cfg.ckpt),
        input=cfg.input,
        output=cfg.output,
        inference=plain(cfg.get("inference")),
        tta=cfg.tta,
        save_probabilities=cfg.save_probabilities,
        device=cfg.device,
        amp=cfg.amp,
        largest_component=plain(cfg.postprocess.largest_component),
        datalist_key=cfg.get("datalist_key"),
        cache_dir=cfg.paths.cache_dir,
        endpoint_url=cfg.get("endpoint_url"),
        image_pattern=plain(cfg.get("image_pattern")),
        output_format=plain(cfg.get("output_format", "nifti")),
        overwrite=bool(cfg.get("overwrite", False)),
    )
    segs = f" ({len(report.dicom_seg)} as DICOM SEG)" if report.dicom_seg else ""
    kept = f" (kept {len(report.kept)} finished earlier)" if report.kept else ""
    print(f"Wrote {len(report.written)} mask(s){segs} to {report.output}{kept}", flush=True)
    report.raise_for_failures()
    return report


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.predict"):
        run(cfg)


if __name__ == "__main__":
    main()
