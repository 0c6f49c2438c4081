"""SegModule: a MONAI network as a LightningModule: its training and validation steps, and the path from logits to
masks that validation, prediction and pictures share. Networks, losses and optimisers are built from their configs
by ``seglight.models`` and ``seglight.training.optim``."""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import SurfaceDiceMetric
from monai.networks.utils import one_hot

from seglight.core.containers import plain
from seglight.core.errors import ConfigError, DataError
from seglight.core.internals import attached_trainer
from seglight.data.sampling import is_placeholder
from seglight.models.losses import DEFAULT_LOSS, loss_for_task
from seglight.models.metrics import (
    DeviceDiceMetric,
    HD95Metric,
    SurfaceMetrics,
    image_spacing,
    per_class_means,
)
from seglight.models.networks import DEFAULT_COMPUTE, DEFAULT_NET, build_network, out_channels
from seglight.training.distributed import gather_rows
from seglight.training.optim import (
    DEFAULT_OPTIMIZER,
    build_optimizer,
    build_schedule,
    follow_schedule_length,
    gradient_clipping,
    schedule_config,
)

log = logging.getLogger("seglight")

# How whole volumes are segmented, in validation and in prediction: without roi_size the network sees the whole
# volume at once (the lab's resize mode); with it, MONAI's sliding-window inference runs windows of that size
# and blends them.
DEFAULT_INFERENCE = {
    "roi_size": None,
    "sw_batch_size": 4,
    "overlap": 0.5,
    "mode": "gaussian",
    "sw_device": None,  # where the windows run (None: where the image is)
    "device": None,  # where the whole-volume output is stitched (None: where the image is; "cpu" saves GPU memory)
}
# hd95_every_n: the surface metrics (HD95, NSD) at every n-th validation only (they run on the CPU).
DEFAULT_METRICS = {"hd95": True, "surface_dice_tolerance": None, "hd95_every_n": 1}
DEFAULT_THRESHOLD = 0.5


class SegModule(L.LightningModule):
    """3D segmentation, binary (one output channel, sigmoid) or multi-class (one channel per label, softmax).

    The task follows the network's ``out_channels``: 1 is the reference binary setup (sigmoid, Dice on
    ``sigmoid > threshold``); more is multi-class (softmax over one-hot targets, Dice on the argmax). The loss
    config is adapted to match (``sigmoid`` or ``softmax`` + ``to_onehot_y`` for MONAI's Dice-family losses), so
    one ``conf/loss`` option serves both. Everything is given as configs (``_target_`` plus arguments, as in
    ``conf/``) and saved with the checkpoint, so ``SegModule.load_from_checkpoint(path)`` needs nothing else,
    for training or for prediction (``seglight.predict_volume(module, "scan.nii.gz")``).

    From logits to masks, one path serves validation, prediction and pictures: ``probabilities(logits)``, then
    ``labels(probabilities)``.

    Args:
        net: config of any ``monai.networks.nets`` class (or other ``nn.Module``): ``_target_`` and constructor
            arguments.
        loss: config of the loss, called as ``loss(logits, target)``.
        optimizer: partial config of a ``torch.optim`` optimiser, completed with the parameters.
        scheduler: optional LR schedule in Lightning's shape: ``scheduler`` (a partial config of an LR scheduler,
            completed with the optimiser; ``auto`` lengths become the run's length), ``interval`` (``epoch`` or
            ``step``), and ``warmup_fraction`` (sets ``warmup_steps`` to that share of the run).
        threshold: probability above which a voxel is foreground (binary task).
        label_names: label value -> name (background 0 included), for per-class metric names.
        inference: how whole volumes are segmented in validation and prediction (see ``DEFAULT_INFERENCE``).
        metrics: ``hd95`` (bool) and ``surface_dice_tolerance`` (mm, or None) besides Dice; ``hd95_every_n``
            computes these surface metrics at every n-th validation only.
        compute: memory and speed switches ``checkpointing``, ``channels_last``, ``compile`` (see
            ``seglight.models.networks``); they change neither the weights nor the outputs.
        data: the data settings prediction needs to read and preprocess new scans as training did
            (``SegDataModule.prediction_settings()``); saved so that a loaded module can predict on its own.
        plan: the record of the training plan the run used (``plan=auto`` or ``plan=<file>``: its options, where
            it came from, the overrides applied); saved with the checkpoint (absent without a plan).
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        label_names: Mapping[int, str] | None = None,
        inference: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        compute: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        plan: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        net = plain(net if net is not None else DEFAULT_NET)
        channels = out_channels(net)
        softmax = channels > 1
        self.save_hyperparameters(
            {
                "net": net,
                "loss": loss_for_task(plain(loss if loss is not None else DEFAULT_LOSS), softmax),
                "optimizer": plain(optimizer if optimizer is not None else DEFAULT_OPTIMIZER),
                "scheduler": schedule_config(plain(scheduler)),
                "threshold": float(threshold),
                "label_names": {int(k): str(v) for k, v in (label_names or {}).items()},
                "inference": {**DEFAULT_INFERENCE, **(plain(inference) or {})},
                "metrics": {**DEFAULT_METRICS, **(plain(metrics) or {})},
                "compute": {**DEFAULT_COMPUTE, **(plain(compute) or {})},
                "data": plain(data) or {},
                **({"plan": plain(plan)} if plan else {}),  # without a plan, what 0.1.0 saved
            }
        )
        self.softmax = softmax
        # Classes including background; the binary task has two (background and foreground).
        self.num_classes = channels if softmax else 2
        self.net = build_network(self.hparams.net, self.hparams.compute)
        self.channels_last = bool(self.hparams.compute.get("channels_last"))
        self.loss_fn = instantiate(self.hparams.loss)
        # Dice stays on the device; the surface metrics run on the CPU beside it (see SurfaceMetrics).
        self.dice = DeviceDiceMetric()
        self.hd95 = HD95Metric() if self.hparams.metrics["hd95"] else None
        tolerance = self.hparams.metrics["surface_dice_tolerance"]
        self.nsd = (
            SurfaceDiceMetric([float(tolerance)] * (self.num_classes - 1), include_background=False)
            if tolerance is not None
            else None
        )
        self.hd95_every_n = int(self.hparams.metrics["hd95_every_n"])
        if self.hd95_every_n < 1:
            raise ConfigError(f"metrics.hd95_every_n must be at least 1, got {self.hd95_every_n}")
        surface = [m for m in (self.hd95, self.nsd) if m is not None]
        self.surface = SurfaceMetrics(surface, expand=self.metric_masks) if surface else None
        self._surface_counted = True  # whether this validation measures the surface metrics
        # Wall time of this session's validations (sanity check excluded), for the run summary.
        self.validation_time_s = 0.0
        self.last_validation_s: float | None = None
        self.validations = 0
        self._validation_started: float | None = None
        self._label_ranges: list[tuple[Any, list[str]]] = []
        self._warned: set[str] = set()
        # Per-case values of this process's validation cases, in the order it scores them ("loss", metric names).
        self._val_rows: dict[str, list[torch.Tensor]] = {}

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the network."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    @property
    def class_names(self) -> list[str]:
        """Metric names of the foreground classes 1..C-1: the dataset's label names, made tag-safe."""
        names = self.hparams.label_names
        return [_tag(names.get(c, f"class{c}")) for c in range(1, self.num_classes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, MetaTensor):
            x = x.as_tensor()  # the network needs no metadata, and plain tensors are faster (and compile)
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x)

    def infer(self, image: torch.Tensor, settings: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Logits for whole volumes: one forward pass, or sliding windows when ``inference.roi_size`` is set.

        ``settings`` replaces the saved ``inference`` settings it names (prediction passes its own).
        """
        settings = {**self.hparams.inference, **(settings or {})}
        if not settings.get("roi_size"):
            return self(image)
        if isinstance(image, MetaTensor):
            image = image.as_tensor()
        return sliding_window_inference(
            image,
            roi_size=list(settings["roi_size"]),
            sw_batch_size=int(settings["sw_batch_size"]),
            predictor=self,
            overlap=float(settings["overlap"]),
            mode=settings["mode"],
            sw_device=settings.get("sw_device") or image.device,
            device=settings.get("device") or image.device,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Label values are checked when each case is first read (seglight.data.checks), not here: reading a
        # value of a GPU tensor would make every step wait for the GPU.
        image, label = batch["image"], batch["label"]
        try:
            logits = self(image)
        except ValueError as exc:
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise ConfigError(
                f"{type(self.net).__name__} normalises over the batch (BatchNorm), and a training batch of "
                f"{image.shape[0]} reaches a 1x1x1 feature map: use data.batch_size=2 or more, a larger "
                "data.spatial_size (data.patch.size in patch mode), or instance normalisation (model.norm=instance)"
            ) from exc
        loss = self.loss_fn(logits, as_float_label(label))
        # sync_dist: averaged over the processes once per epoch (they all take the same number of steps). The one
        # per-step cost kept here: Lightning's bookkeeping of the running mean, about 0.7 ms of host time and no
        # wait for the device; it is the loss curve every tracker and the epoch line show.
        self.log(
            "Loss/train",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=image.shape[0],
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Nothing here waits for the device: per-case loss and Dice stay on it, the surface metrics go to a CPU
        # thread, and the label values are checked when the epoch's metrics are read.
        if is_placeholder(batch):
            return  # a placeholder that evens out the processes' validation steps: nothing to score
        image, label = batch["image"], batch["label"]
        logits = self.infer(image)
        label = label.to(logits.device)  # the stitched output may live on the CPU
        self._label_ranges.append((label.flatten(1).aminmax(dim=1), _case_ids(batch, label.shape[0])))
        if self.softmax:
            # A value outside 0..C-1 would fail inside one_hot on the GPU, without naming the case: it is kept in
            # range here and reported by check_label_ranges at the end of the epoch.
            label = label.clamp(0, self.num_classes - 1)
        loss = self.loss_fn(logits, as_float_label(label))
        self._record("loss", loss.detach().reshape(1, 1).expand(image.shape[0], 1))
        predicted = self.labels(self.probabilities(logits))
        # The Dice call returns the batch's per-case values; they are kept here rather than in the metric's
        # buffer, which MONAI would gather across processes on its own (and wait for processes without cases).
        self._record("dice", self.dice(self.class_masks(predicted), self.class_masks(label)))
        if self.surface is not None and self._surface_counted:
            spacing = image_spacing(image)  # mm, from the affine after the deterministic transforms (host)
            target = label if label.dtype == torch.uint8 or self.num_classes > 256 else label.to(torch.uint8)
            self.surface.submit(predicted, target, spacing)

    def _record(self, name: str, values: torch.Tensor) -> None:
        self._val_rows.setdefault(name, []).append(values.detach().float())  # on the device: no sync

    def surface_metrics_due(self) -> bool:
        """Whether this validation measures HD95/NSD: the first, then every ``metrics.hd95_every_n``-th."""
        return validation_due(attached_trainer(self), self.hd95_every_n)

    def metric_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """A label map ``(B, 1, ...)`` as the float masks the metrics take (one channel, or one-hot)."""
        return self.class_masks(labels).float()

    def on_validation_start(self) -> None:
        self._validation_started = time.perf_counter()
        self._label_ranges = []

    def on_validation_epoch_start(self) -> None:
        self._surface_counted = self.surface_metrics_due()

    def _validation_done(self) -> None:
        # Called once the metrics are read back, so the device's work is done; checkpoint writes come after.
        if self._validation_started is None or self.trainer.sanity_checking:
            return
        self.last_validation_s = time.perf_counter() - self._validation_started
        self.validation_time_s += self.last_validation_s
        self.validations += 1
        self._validation_started = None

    def teardown(self, stage: str) -> None:
        if self.surface is not None:
            self.surface.close()

    def on_validation_epoch_end(self) -> None:
        self.check_label_ranges()
        if self.surface is not None:
            self.surface.wait()
        # Every process gathers every case's values in the same order, so all log the same numbers and the
        # reductions run exactly as on one process. Each process takes part even with nothing of its own.
        rows, self._val_rows = self._val_rows, {}
        for key, metric in (
            ("hd95", self.hd95),
            ("nsd", self.nsd),
        ):  # counted by the surface thread, in order
            buffer = metric.get_buffer() if metric is not None and self._surface_counted else None
            if isinstance(buffer, torch.Tensor) and buffer.numel():
                rows[key] = [buffer]
        for metric in (self.dice, self.hd95, self.nsd):
            if metric is not None:
                metric.reset()
        losses = gather_rows(self, rows.get("loss"), 1)
        if losses is not None:
            self._log_gathered("Loss/val", float(losses.double().mean()))
        dice, per_class = per_class_means(gather_rows(self, rows.get("dice"), self.num_classes - 1))
        # As MONAI's DiceMetric reports it: 0 when no validation case has any foreground.
        self._log_gathered("Dice/val", dice if dice is not None else 0.0, prog_bar=True)
        self._log_per_class("Dice/val", per_class)
        for name, key, metric in (("HD95/val", "hd95", self.hd95), ("NSD/val", "nsd", self.nsd)):
            if metric is None or not self._surface_counted:
                continue
            mean, per_class = per_class_means(gather_rows(self, rows.get(key), self.num_classes - 1))
            if mean is None:
                self._warn_once(name, f"{name} not logged: no validation case has any foreground to measure")
            else:
                self._log_gathered(name, mean)
            self._log_per_class(name, per_class)
        self._validation_done()

    def _log_per_class(self, name: str, values: list[float | None]) -> None:
        for class_name, value in zip(self.class_names, values, strict=False):
            if value is None:
                self._warn_once(
                    f"{name}/{class_name}",
                    f"{name}/{class_name} not logged: no validation case has '{class_name}' to measure it on",
                )
            else:
                self._log_gathered(f"{name}/{class_name}", value)

    def _log_gathered(self, name: str, value: float, **kwargs: Any) -> None:
        """Log a value that every process computed alike from the gathered cases.

        ``max`` over identical values leaves them as they are; ``sync_dist`` only tells Lightning they are
        already the values of all processes (it would otherwise warn that they might not be).
        """
        self.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._warned.add(key)
            log.warning(message)

    # -- from logits to masks -----------------------------------------------------------------------------

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C, ...)``: the sigmoid of the one channel (binary), else softmax over channels."""
        logits = logits.float()
        return torch.softmax(logits, dim=1) if self.softmax else torch.sigmoid(logits)

    def labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Label maps ``(B, 1, ...)`` of label values (0 background): ``> threshold`` (binary), else the argmax."""
        if not self.softmax:
            return (probabilities > self.hparams.threshold).to(torch.uint8)
        dtype = torch.uint8 if self.num_classes <= 256 else torch.int16
        return probabilities.argmax(1, keepdim=True).to(dtype)

    def class_masks(self, labels: torch.Tensor) -> torch.Tensor:
        """Label maps ``(B, 1, ...)`` as the float masks MONAI's metrics compare: one channel per class, background
        first (multi-class), or the one foreground channel (binary)."""
        if self.softmax:
            return one_hot(labels.long(), self.num_classes, dim=1)
        return labels.float()

    def check_label_ranges(self) -> None:
        """DataError naming the first validation case whose label map held a value the network has no output for
        (the ranges were recorded in the steps, on the device, and are read here, once an epoch)."""
        ranges, self._label_ranges = self._label_ranges, []
        check_label_ranges(ranges, self.num_classes, self.softmax)

    # -- optimisation -------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        trainer = attached_trainer(self)
        optimizer = build_optimizer(self.hparams.optimizer, self.parameters(), gradient_clipping(trainer))
        if not self.hparams.scheduler:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_schedule(self.hparams.scheduler, optimizer, trainer),
        }

    def on_train_start(self) -> None:
        follow_schedule_length(self.trainer, self.hparams.scheduler)


def _case_ids(batch: Mapping[str, Any], count: int) -> list[str]:
    ids = batch.get("case_id") if isinstance(batch, Mapping) else None
    if isinstance(ids, list | tuple) and len(ids) == count:
        return [str(i) for i in ids]
    return [f"validation case {i}" for i in range(count)]


def as_float_label(label: torch.Tensor) -> torch.Tensor:
    """A label map as float32 for the loss and metrics. The loaders serve label maps as uint8 (a quarter of the
    bytes to copy and move); the cast runs where the batch already is, on the GPU after the transfer."""
    return label if label.is_floating_point() else label.float()


def check_label_ranges(ranges: list[tuple[Any, list[str]]], num_classes: int, softmax: bool) -> None:
    """DataError naming the first case whose label map held a value outside 0..num_classes-1.

    ``ranges``: per batch, the (lowest, highest) label value of each case (tensors) and the cases' ids.
    """
    for (low, high), ids in ranges:
        for case, lo, hi in zip(ids, low.tolist(), high.tolist(), strict=True):
            if lo < 0 or hi >= num_classes:
                expected = "0 or 1 (binary)" if not softmax else f"0..{num_classes - 1}"
                raise DataError(
                    f"{case}: the label map holds value {hi if hi >= num_classes else lo}, but the model expects "
                    f'{expected}; check the dataset\'s labels (dataset.json "labels") and model.out_channels'
                )


def validation_due(trainer: L.Trainer | None, every_n: int) -> bool:
    """Whether this validation is the first or an ``every_n``-th one (surface metrics, pictures).

    Counted from the epoch, so a resumed run keeps the same rhythm.
    """
    if trainer is None:
        return True
    interval = trainer.check_val_every_n_epoch or 1
    return (trainer.current_epoch // interval) % every_n == 0


def _tag(name: str) -> str:
    """A label name as one metric-name level that every tracker keeps as it is: letters, digits, ``_`` and ``-``
    (MLflow renames other characters, W&B nests on dots, TensorBoard groups on slashes)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # Läsion -> Lasion
    return re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_name.strip()).strip("_") or "unnamed"
