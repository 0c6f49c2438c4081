"""Pictures: the reference lab's three panels (input, ground truth, prediction) and the training progress plot.

Drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state), so the same code works in
training jobs, tests and notebooks. ``python -m seglight.viz image=<scan> [label=<mask>] [pred=<mask>]
out=<png>`` (``seglight/viz.py``) draws the panels for NIfTI files in their own geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from seglight.core.errors import ConfigError, DataError
from seglight.core.geometry import same_grid, spacing_from_affine
from seglight.core.io import atomic_path, load_nifti, read_array

log = logging.getLogger("seglight")

# In RAS-ordered arrays (x: left->right, y: posterior->anterior, z: inferior->superior), the axis each view
# fixes, and the two axes it shows (horizontal, vertical).
VIEWS: dict[str, tuple[int, int, int]] = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
SLICE_CHOICES = ("max", "middle")
COLUMNS = ("input", "ground truth", "prediction")
# The curves of the progress plot, in the order they are drawn.
PROGRESS_SERIES = ("Loss/train", "Loss/val", "Dice/val", "lr")
LABEL_COLOURS = ["#2ca02c", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# -- the three panels ----------------------------------------------------------------------------------------------


def choose_slices(
    shape: Sequence[int], masks: Sequence[np.ndarray | None], how: str = "max"
) -> dict[str, int]:
    """Slice index per view: the middle one, or the one with the most foreground (ground truth first).

    ``max`` falls back to the prediction when the ground truth is empty, and to the middle when both are.
    """
    if how not in SLICE_CHOICES:
        raise ConfigError(f"slice={how!r}: choose one of {', '.join(SLICE_CHOICES)}")
    chosen = {view: int(shape[axis]) // 2 for view, (axis, _, _) in VIEWS.items()}
    if how == "middle":
        return chosen
    for mask in masks:
        if mask is None or not np.any(mask):
            continue
        for view, (axis, _, _) in VIEWS.items():
            other = tuple(a for a in range(3) if a != axis)
            chosen[view] = int(np.argmax(np.count_nonzero(mask, axis=other)))
        break
    return chosen


def three_panel_figure(
    image: Any,
    label: Any = None,
    pred: Any = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    slice: str = "max",  # noqa: A002 - the option's name
    title: str | None = None,
) -> Figure:
    """Input, ground truth over the input, prediction over the input; one row per view (axial, coronal, sagittal).

    ``image``, ``label`` and ``pred`` are 3D arrays (numpy or torch) on the same grid, in RAS order as the
    training pipeline makes them; label maps may hold several values, each drawn in its own colour.
    """
    volume = _array(image).astype(np.float32)
    if volume.ndim != 3:
        raise DataError(f"the picture needs a 3D image, got shape {volume.shape}")
    masks = [None if m is None else _array(m).astype(np.int32) for m in (label, pred)]
    for name, mask in zip(("label", "prediction"), masks, strict=True):
        if mask is not None and mask.shape != volume.shape:
            raise DataError(
                f"the {name} has shape {mask.shape} but the image {volume.shape}: not the same grid"
            )
    slices = choose_slices(volume.shape, masks, slice)
    low, high = np.percentile(volume, [0.5, 99.5]) if volume.size else (0.0, 1.0)
    top = max([int(m.max()) for m in masks if m is not None and m.size] + [1])
    colours = ListedColormap([LABEL_COLOURS[i % len(LABEL_COLOURS)] for i in range(top)])

    fig = Figure(figsize=(9.0, 9.0), dpi=80, layout="constrained")
    axes = fig.subplots(len(VIEWS), len(COLUMNS), squeeze=False)
    for row, (view, (axis, across, up)) in enumerate(VIEWS.items()):
        index = slices[view]
        aspect = float(spacing[up]) / float(spacing[across])
        for col, name in enumerate(COLUMNS):
            ax = axes[row][col]
            ax.imshow(
                _plane(volume, axis, index), cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect
            )
            mask = masks[col - 1] if col > 0 else None
            if mask is not None:
                plane = _plane(mask, axis, index)
                ax.imshow(
                    np.ma.masked_equal(plane, 0),
                    cmap=colours,
                    vmin=0.5,
                    vmax=top + 0.5,
                    alpha=0.5,
                    origin="lower",
                    aspect=aspect,
                    interpolation="nearest",
                )
            elif col > 0:
                ax.text(0.5, 0.5, f"no {name}", ha="center", va="center", color="w", transform=ax.transAxes)
            if across == 0:  # radiological convention: the patient's right on the viewer's left
                ax.invert_xaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(f"{view} {index}")
    if title:
        fig.suptitle(title)
    return fig


def nifti_figure(
    image: Any,
    label: Any = None,
    pred: Any = None,
    slice: str = "max",
    title: str | None = None,  # noqa: A002
) -> Figure:
    """The three panels for NIfTI files (or nibabel images), reordered to RAS without resampling."""
    images = [None if x is None else _canonical(x) for x in (image, label, pred)]
    reference = images[0]
    assert reference is not None
    for name, other in zip(("label", "pred"), images[1:], strict=True):
        if other is not None and (
            other.shape[:3] != reference.shape[:3] or not same_grid(other.affine, reference.affine)
        ):
            raise DataError(
                f"{name}: not on the image's voxel grid (shape or affine differs), cannot overlay"
            )
    arrays = [None if x is None else _volume(x) for x in images]
    spacing = spacing_from_affine(reference.affine)
    return three_panel_figure(arrays[0], arrays[1], arrays[2], spacing=spacing, slice=slice, title=title)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG through a temporary file and a rename (readers never see half a picture)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        FigureCanvasAgg(fig).print_png(str(tmp))
    return path


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array (for TensorBoard)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transposed so the first remaining axis runs horizontally and the second upwards (with origin="lower").
    return np.take(volume, index, axis=axis).T


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def _canonical(value: Any) -> Any:
    if isinstance(value, str | Path):
        value = load_nifti(value)
    return nib.as_closest_canonical(value)


def _volume(image: Any) -> np.ndarray:
    """The first 3D volume of an image (the first channel of a 4D one)."""
    data = read_array(image, image.get_filename() or "the image")
    return data[..., 0] if data.ndim == 4 else data


# -- during training: a picture in TensorBoard, and progress.png at the end ----------------------------------------


def progress_figure(history: Mapping[str, Mapping[int, float]]) -> Figure:
    """Three plots over epochs: loss (training, and validation when logged), Dice/val, learning rate."""
    fig = Figure(figsize=(12.0, 3.6), dpi=80, layout="constrained")
    loss_ax, dice_ax, lr_ax = fig.subplots(1, 3)
    for ax, names, title in (
        (loss_ax, ("Loss/train", "Loss/val"), "loss"),
        (dice_ax, ("Dice/val",), "Dice/val"),
        (lr_ax, ("lr",), "learning rate"),
    ):
        for name in names:
            points = sorted(history.get(name, {}).items())
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if any(history.get("Loss/val")):
        loss_ax.legend()
    dice_ax.set_ylim(0.0, 1.0)
    rates = list(history.get("lr", {}).values())
    if rates and min(rates) > 0 and max(rates) / min(rates) > 10:
        lr_ax.set_yscale("log")
    if not any(history.get(name) for name in PROGRESS_SERIES):
        fig.suptitle("no epochs recorded")
    return fig
