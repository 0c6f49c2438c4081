"""seglight: 3D medical image segmentation with PyTorch Lightning, MONAI and Hydra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from seglight.core.console import setup_library
from seglight.training.run_folder import register_resolvers

__version__ = "0.1.0"
__all__ = ["SegDataModule", "SegModule", "build", "compose", "predict_volume"]

if TYPE_CHECKING:
    from seglight.config.builder import build, compose
    from seglight.data import SegDataModule
    from seglight.prediction.predictor import predict_volume
    from seglight.training.module import SegModule

# The functions live in seglight.config.builder, not seglight.build: a submodule named `build` would replace the
# function `seglight.build` as soon as anything imported it.
_LAZY = {
    "SegModule": "seglight.training.module",
    "SegDataModule": "seglight.data",
    "build": "seglight.config.builder",
    "compose": "seglight.config.builder",
    "predict_volume": "seglight.prediction.predictor",
}

# Before any config is composed: run folders are named by ${seglight.run_name:} (see seglight.training.run_folder).
register_resolvers()


def __getattr__(name: str) -> Any:
    # Imported on first use: `python -m seglight.check --help` should not pay for torch and MONAI.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        # The API's console is the commands' (no Lightning start-up lines, known warnings dropped); after the
        # import, which gives Lightning's loggers their own stderr handlers.
        setup_library()
        return value
    raise AttributeError(f"module 'seglight' has no attribute {name!r}")
