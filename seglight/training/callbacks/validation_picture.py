"""The reference lab's three panels (input, ground truth, prediction) of a validation case, to TensorBoard."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from seglight.core.errors import ConfigError
from seglight.core.geometry import spacing_from_affine
from seglight.data.sampling import is_placeholder
from seglight.training.module import validation_due
from seglight.visualization.figures import SLICE_CHOICES, figure_to_rgb, three_panel_figure


class ValidationPicture(L.Callback):
    """Logs the three panels of one fixed validation case to TensorBoard every ``every_n_val_epochs`` validations.

    Args:
        every_n_val_epochs: draw at the 1st validation and then every N-th one.
        case_index: which validation case (validation batches hold one case each).
        slice: ``max`` (the slice with the most ground-truth foreground) or ``middle``.
        tag: the TensorBoard image tag.
    """

    def __init__(
        self,
        every_n_val_epochs: int = 5,
        case_index: int = 0,
        slice: str = "max",
        tag: str = "Validation/overlay",  # noqa: A002
    ) -> None:
        if int(every_n_val_epochs) < 1:
            raise ConfigError(
                f"callbacks.validation_picture.every_n_val_epochs must be >= 1, got {every_n_val_epochs}"
            )
        if slice not in SLICE_CHOICES:
            raise ConfigError(f"callbacks.validation_picture.slice must be one of {', '.join(SLICE_CHOICES)}")
        self.every = int(every_n_val_epochs)
        self.case_index = int(case_index)
        self.slice = slice
        self.tag = tag

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or batch_idx != self.case_index:
            return
        if is_placeholder(batch):  # a placeholder that evens out the processes' validation steps under DDP
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not validation_due(trainer, self.every):
            return
        image = batch["image"][:1]
        with torch.no_grad():  # segmented as validation does: whole volume, or sliding windows in patch mode
            pred = pl_module.labels(pl_module.probabilities(pl_module.infer(image)))[0, 0]
        label = batch.get("label")
        label = None if label is None else (label[0, 0] if label.shape[1] == 1 else label[0].argmax(0))
        affine = getattr(image, "affine", None)
        spacing = (
            [1.0, 1.0, 1.0] if affine is None else spacing_from_affine(affine).reshape(-1, 3)[0].tolist()
        )
        fig = three_panel_figure(
            image[0, 0],
            label,
            pred,
            spacing=spacing,
            slice=self.slice,
            title=f"epoch {trainer.current_epoch}",
        )
        picture = figure_to_rgb(fig)
        for logger in loggers:
            logger.experiment.add_image(
                self.tag, picture, global_step=trainer.current_epoch, dataformats="HWC"
            )
