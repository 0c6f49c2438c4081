"""What MONAI's metrics leave to the caller: the voxel spacing of a transformed image, a HD95 that does not
drop a missed structure, per-class reductions that say when a class had nothing to measure, a Dice that never
waits for the GPU, and surface metrics computed on the CPU while the GPU goes on."""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction

from seglight.core.geometry import spacing_from_affine


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


class DeviceDiceMetric(DiceMetric):
    """MONAI's ``DiceMetric(include_background=False)`` computed with tensor operations only.

    MONAI's version tests each case's voxel count in Python and uses ``masked_select``, so every validation case
    waits for the GPU; this one gives the same ``(B, C)`` values (NaN where the ground truth is empty) without
    leaving the device. Predictions and targets are binary masks: one channel (binary task) or one-hot.
    """

    def __init__(self) -> None:
        super().__init__(include_background=False, reduction="mean")

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape[1] == 1:
            pred, truth = y_pred == 1, y == 1
        else:
            pred, truth = y_pred[:, 1:].bool(), y[:, 1:].bool()
        pred, truth = pred.flatten(2), truth.flatten(2)
        # Counts are exact integers; float sums would round past 2**24 voxels.
        both = (pred & truth).sum(-1)
        size = truth.sum(-1) + pred.sum(-1)
        dice = (2 * both).float() / size.clamp_min(1).float()
        return torch.where(truth.any(-1), dice, torch.full_like(dice, float("nan")))


class SurfaceMetrics:
    """HD95 and NSD on the CPU, off the accelerator's path: the GPU segments the next volume meanwhile.

    Each ``submit`` sends the prediction and the ground truth as label maps (one byte a voxel) to the host with a
    non-blocking copy; a background thread waits for that copy alone, expands the maps (``expand``: to the
    metrics' layout) and updates the metrics. Nothing in the caller waits for the device. ``wait`` returns when
    every submitted case is counted (and raises what the thread raised). Tensors on the CPU are measured at once
    unless ``background`` is True.

    Args:
        metrics: the MONAI metrics to update, called as ``metric(prediction, target, spacing=...)``.
        expand: label map ``(B, 1, ...)`` -> the masks the metrics take (float; one channel or one-hot).
        background: force (True) or forbid (False) the thread; None: for tensors on a CUDA device.
        max_pending: cases in flight at most; more waits for the oldest, bounding host memory.
    """

    def __init__(
        self,
        metrics: Sequence[Any],
        expand: Any,
        background: bool | None = None,
        max_pending: int = 4,
    ) -> None:
        self.metrics = list(metrics)
        self.expand = expand
        self.background = background
        self.max_pending = max(1, int(max_pending))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def submit(
        self, prediction: torch.Tensor, target: torch.Tensor, spacing: Sequence[Sequence[float]] | None
    ) -> None:
        """Count one batch: label maps ``(B, 1, ...)`` of the prediction and the ground truth."""
        background = prediction.device.type == "cuda" if self.background is None else self.background
        if not background:
            self._update(prediction.detach().cpu(), target.detach().cpu(), spacing, None)
            return
        event = None
        from_cuda = prediction.device.type == "cuda" or target.device.type == "cuda"
        prediction, target = _to_host(prediction), _to_host(target)
        if from_cuda:
            event = torch.cuda.Event()
            event.record()  # after the copies on the current stream: the thread waits for this, not the GPU
        if self._pool is None:
            # One thread keeps the metrics' per-case order and leaves the other cores to the training process.
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seglight-surface-metrics")
        self._pending.append(self._pool.submit(self._update, prediction, target, spacing, event))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()

    def _update(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        spacing: Sequence[Sequence[float]] | None,
        event: Any,
    ) -> None:
        if event is not None:
            event.synchronize()
        prediction, target = self.expand(prediction), self.expand(target)
        for metric in self.metrics:
            metric(prediction, target, spacing=spacing)

    def wait(self) -> None:
        """Block until every submitted case is counted; re-raises an error of the background thread."""
        while self._pending:
            self._pending.popleft().result()

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles of the module (checkpoint hyperparameters, DDP spawn) take no thread along.
        return {**self.__dict__, "_pool": None, "_pending": deque()}

    def close(self) -> None:
        """Drop what is in flight and stop the thread."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU; from a CUDA device without waiting (into pinned memory), so it is read after an event."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        return tensor.to("cpu", non_blocking=True)
    return tensor.clone() if tensor.device.type == "cpu" else tensor.cpu()
