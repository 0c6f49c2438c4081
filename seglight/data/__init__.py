"""Datasets, datalists and transforms."""

from seglight.data.datamodule import SegDataModule

__all__ = ["SegDataModule"]
