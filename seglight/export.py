"""Export a trained network for deployment: ``python -m seglight.export ckpt=<file> format=torchscript|onnx|bundle``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from seglight.core.console import setup as setup_console
from seglight.core.containers import plain
from seglight.core.errors import ConfigError, reported_errors
from seglight.exporting.bundle import BundleResult, export_bundle
from seglight.exporting.formats import ExportResult, export_checkpoint

_EXAMPLE = "python -m seglight.export ckpt=<run>/checkpoints/last.ckpt format=torchscript"


def run(cfg: DictConfig) -> ExportResult | BundleResult:
    """Export ``cfg.ckpt`` as ``cfg.format`` (see conf/export.yaml); prints where the files went."""
    if not cfg.get("ckpt"):
        raise ConfigError(f"ckpt= is required, e.g. {_EXAMPLE}")
    if str(cfg.format).strip().lower() == "bundle":  # a folder, not a model file: its own writer
        bundle = export_bundle(cfg.ckpt, cfg.get("output"), plain(cfg.get("inference")))
        print(f"Wrote the MONAI bundle {bundle.folder}", flush=True)
        return bundle
    spatial_size = OmegaConf.to_container(cfg.spatial_size) if cfg.get("spatial_size") is not None else None
    result = export_checkpoint(
        ckpt=cfg.ckpt,
        format=cfg.format,
        output=cfg.get("output"),
        opset=cfg.opset,
        dynamo=cfg.dynamo,
        spatial_size=spatial_size,
    )
    print(f"Wrote {result.model_path} and {result.metadata_path.name}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.export"):
        run(cfg)


if __name__ == "__main__":
    main()
