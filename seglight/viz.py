"""Draw a scan with its masks: ``python -m seglight.viz image=<scan> [label=<mask>] [pred=<mask>] [out=<png>]``."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from seglight.core.console import setup as setup_console
from seglight.core.errors import ConfigError, reported_errors
from seglight.core.io import nifti_stem
from seglight.visualization.figures import nifti_figure, save_figure

_EXAMPLE = "python -m seglight.viz image=<scan> label=<mask> pred=<mask> out=<png>"


def check_options(cfg: DictConfig) -> None:
    """``image=`` is given."""
    if not cfg.get("image"):
        raise ConfigError(f"image= is required: {_EXAMPLE}")


def run(cfg: DictConfig) -> Path:
    """Draw the three panels that ``cfg`` (conf/viz.yaml) names into a PNG; returns its path."""
    check_options(cfg)
    image = str(cfg.image)
    out = Path(cfg.get("out") or f"{nifti_stem(image)}_overlay.png")
    fig = nifti_figure(
        image, cfg.get("label"), cfg.get("pred"), slice=cfg.slice, title=cfg.get("title") or Path(image).name
    )
    path = save_figure(fig, out)
    print(f"Wrote {path}", flush=True)
    return path


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="viz")
def main(cfg: DictConfig) -> None:
    """Command-line entry point."""
    setup_console()
    with reported_errors("seglight.viz"):
        run(cfg)


if __name__ == "__main__":
    main()
