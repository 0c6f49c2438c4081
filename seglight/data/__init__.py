"""Datasets, datalists and transforms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["SegDataModule"]

if TYPE_CHECKING:
    from seglight.data.datamodule import SegDataModule


def __getattr__(name: str) -> Any:
    # Imported on first use, so that light modules of this package (caching.files, for
    # `python -m seglight.cache`) load without torch and MONAI.
    if name == "SegDataModule":
        from seglight.data.datamodule import SegDataModule

        return SegDataModule
    raise AttributeError(f"module 'seglight.data' has no attribute {name!r}")
