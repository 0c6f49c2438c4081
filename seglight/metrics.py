"""What MONAI's metrics leave to the caller: the voxel spacing of a transformed image, a HD95 that does not
drop a missed structure, and per-class reductions that say when a class had nothing to measure."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric, compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction

from seglight.io import spacing_from_affine


def image_spacing(image: torch.Tensor) -> list[list[float]] | None:
    """Per-case spacing of a batch from its MetaTensor affine; None for a plain tensor (no geometry known)."""
    if not isinstance(image, MetaTensor):
        return None
    spacing = np.atleast_2d(spacing_from_affine(image.affine))
    if spacing.shape[0] == 1 and image.shape[0] > 1:  # one affine for the whole batch
        spacing = np.repeat(spacing, image.shape[0], axis=0)
    return spacing.tolist()


def foreground_present(mask: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` booleans: is there any foreground in each class channel (background dropped as MONAI does)."""
    channels = mask[:, 1:] if mask.shape[1] > 1 else mask
    return channels.flatten(2).bool().any(-1)


def volume_diagonal(shape: Sequence[int], spacing: Sequence[Sequence[float]] | None) -> torch.Tensor:
    """Length (mm) of the diagonal of a volume of ``shape`` voxels, per case: the largest possible distance."""
    extent = torch.tensor([float(n) for n in shape], dtype=torch.float64)
    if spacing is None:
        return extent.norm().reshape(1).float()
    return (extent[None] * torch.tensor(spacing, dtype=torch.float64)).norm(dim=1).float()


def hd95_mm(
    y_pred: torch.Tensor, y: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None
) -> torch.Tensor:
    """HD95 in mm per case and class, ``(B, C)``, of masks ``(B, C, ...)``, where a missed structure counts.

    MONAI documents that an empty prediction or an empty ground truth "may result in nan/inf distance"; for the
    95th percentile it gives NaN, which every reduction then skips, so a model that misses a structure would
    look perfect. Here a class present in only one of prediction and ground truth scores the largest distance
    the volume allows (its diagonal in mm). A class absent from both stays NaN (nothing to measure), and
    reductions skip it as MONAI's do. Background is dropped as ``include_background=False`` does. Computed on
    the CPU: the KD-tree surface distance there is fast and needs neither cuCIM nor GPU memory.
    """
    y_pred, y = y_pred.detach().float().cpu(), y.detach().float().cpu()
    with warnings.catch_warnings():
        # Empty masks are handled just below; MONAI's warning per case and class would only be noise.
        warnings.filterwarnings("ignore", message=".*may result in nan/inf distance")
        hd = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing)
    one_sided = foreground_present(y_pred) ^ foreground_present(y)
    worst = volume_diagonal(y.shape[2:], spacing).expand(y.shape[0])
    return torch.where(one_sided, worst[:, None].to(hd.dtype), hd)


class HD95Metric(HausdorffDistanceMetric):
    """``HausdorffDistanceMetric(percentile=95)`` in mm with seglight's empty-mask rule (see ``hd95_mm``)."""

    def __init__(self) -> None:
        super().__init__(include_background=False, percentile=95, reduction="mean")

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return hd95_mm(y_pred, y, kwargs.get("spacing"))


def per_class_means(values: torch.Tensor | None) -> tuple[float | None, list[float | None]]:
    """(mean over cases and classes, mean per class) of per-case values ``(N, C)``, skipping NaN as MONAI does.

    ``values`` is a MONAI metric's buffer (``metric.get_buffer()``). A result is None where nothing could be
    measured (every case NaN), where MONAI's reductions would report 0.
    """
    if values is None or values.numel() == 0:
        return None, []
    data = values.detach().float().cpu().clone()
    valid = ~torch.isnan(data)
    per_class, _ = do_metric_reduction(data.clone(), "mean_batch")
    counts = valid.sum(0).tolist()
    classes = [float(v) if n > 0 else None for v, n in zip(per_class.tolist(), counts, strict=True)]
    mean, _ = do_metric_reduction(data.clone(), "mean")
    return (float(mean) if bool(valid.any()) else None), classes
