"""From checkpoints to masks in the scan's own geometry, one scan at a time.

One model or an ensemble (the folds of a cross-validation), each loaded safely with the preprocessing it was
trained with (``seglight.prediction.models``); sliding-window inference with optional flip test-time augmentation;
the probabilities of all models averaged in the scan's voxel grid after inverting every spatial transform
(orientation, resizing or resampling) with MONAI's ``Invertd``; the module's own ``labels``; optional
largest-component post-processing; and masks as NIfTI images with the input's shape and affine. Many inputs into
a folder: ``seglight.prediction.cases``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from seglight.core.containers import plain
from seglight.core.errors import ConfigError, DataError
from seglight.core.internals import attached_trainer
from seglight.core.io import load_nifti
from seglight.data.datalists import IMAGE
from seglight.data.settings import PREPROCESSING_KEYS
from seglight.prediction.models import (
    Model,
    check_agreement,
    data_settings,
    model_from_checkpoint,
    preprocessing,
)
from seglight.prediction.postprocessing import keep_largest_component, largest_component_labels
from seglight.training.checkpoints import model_checkpoints
from seglight.training.module import DEFAULT_INFERENCE, SegModule

log = logging.getLogger("seglight")

PRED = "pred"
INFERENCE_MODES = ("gaussian", "constant")


def inference_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sliding-window settings given (``inference.*``; null values dropped), checked."""
    given = {k: v for k, v in (plain(settings) or {}).items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULT_INFERENCE))
    if unknown:
        raise ConfigError(
            f"inference.{unknown[0]}: not an option (the options are {', '.join(DEFAULT_INFERENCE)})"
        )
    roi = given.get("roi_size")
    if roi is not None:
        roi = [int(s) for s in (roi if isinstance(roi, Sequence) and not isinstance(roi, str) else [roi] * 3)]
        if len(roi) != 3 or min(roi) < 1:
            raise ConfigError(f"inference.roi_size must be three positive sizes (x, y, z), got {roi}")
        given["roi_size"] = roi
    if "overlap" in given and not 0.0 <= float(given["overlap"]) < 1.0:
        raise ConfigError(f"inference.overlap must be at least 0 and below 1, got {given['overlap']}")
    if "sw_batch_size" in given and int(given["sw_batch_size"]) < 1:
        raise ConfigError(f"inference.sw_batch_size must be at least 1, got {given['sw_batch_size']}")
    if "mode" in given and given["mode"] not in INFERENCE_MODES:
        raise ConfigError(
            f"inference.mode must be one of {', '.join(INFERENCE_MODES)}, got {given['mode']!r}"
        )
    return given


@dataclass
class CasePrediction:
    """One case's prediction in the input's voxel grid."""

    mask: np.ndarray  # (X, Y, Z) label values
    probabilities: np.ndarray | None  # (C, X, Y, Z), when asked for
    reference: Any  # the nibabel image whose geometry the outputs take

    def mask_image(self) -> nib.Nifti1Image:
        """The mask as a NIfTI image with the input's affine and orientation codes."""
        return _like(self.reference, self.mask)

    def probability_image(self) -> nib.Nifti1Image | None:
        """The probabilities as a NIfTI image (channels last, as viewers expect), or None."""
        if self.probabilities is None:
            return None
        probs = (
            self.probabilities[0]
            if self.probabilities.shape[0] == 1
            else np.moveaxis(self.probabilities, 0, -1)
        )
        return _like(self.reference, probs.astype(np.float32))


@dataclass
class _Pipeline:
    """The preprocessing shared by some of the models, and its inversion."""

    settings: dict[str, Any]
    models: list[Model]
    preprocess: mt.Compose = field(init=False)
    invert: mt.Invertd = field(init=False)

    def __post_init__(self) -> None:
        self.preprocess = mt.Compose(preprocessing(self.settings))
        # Probabilities go back with linear interpolation and become labels afterwards, in the scan's grid.
        self.invert = mt.Invertd(keys=PRED, transform=self.preprocess, orig_keys=IMAGE, nearest_interp=False)


class Predictor:
    """Segments images with one trained model or the mean of several, undoing the preprocessing so masks fit the
    scans.

    Args:
        models: a SegModule, a checkpoint file, or a list of either (an ensemble: the folds of a
            cross-validation, say). Checkpoints are read safely and held on the CPU; one network at a time runs.
        data: the data settings to preprocess with, for a module that does not carry them (a SegDataModule,
            its settings, or a checkpoint file); default: each model's own.
        inference: sliding-window settings (``roi_size``, ``overlap``, ``mode``, ``sw_batch_size``, ``sw_device``,
            ``device``) replacing those each model was validated with; ``roi_size`` defaults to the size the
            network was trained on (the patch size in patch mode, the whole resized volume otherwise).
        tta: also predict on the images flipped along each combination of spatial axes, and average.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: half precision on CUDA.
        largest_component: keep only the largest connected component of these labels: ``True`` for every
            label, a list of label values, or a ``postprocessing.json`` from ``seglight.evaluate``.
    """

    def __init__(
        self,
        models: SegModule | str | Path | Sequence[SegModule | str | Path],
        data: Any = None,
        inference: Mapping[str, Any] | None = None,
        tta: bool = False,
        device: str = "auto",
        amp: bool = True,
        largest_component: Any = False,
    ) -> None:
        items = list(models) if isinstance(models, Sequence) and not isinstance(models, str) else [models]
        if not items:
            raise ConfigError("ckpt: no model given")
        given_data = data_settings(data)
        self.models = [self._model(item, given_data) for item in items]
        check_agreement(self.models)
        self.inference = inference_settings(inference)
        self.device = resolve_device(device)
        self.tta = bool(tta)
        self.amp = bool(amp) and self.device.type == "cuda"
        self._network: str | None = None  # the config of the network in memory
        self._module: SegModule | None = None
        self._loaded: Model | None = None  # whose weights it holds
        self._check_weights()
        names = self.models[0].task()["label_names"]
        out_channels = int(self.models[0].task()["out_channels"])
        foreground = sorted(v for v in names if v != 0) or list(range(1, max(2, out_channels)))
        self.largest_component = largest_component_labels(largest_component, foreground)
        groups: dict[str, _Pipeline] = {}
        for model in self.models:
            key = json.dumps({k: model.data.get(k) for k in PREPROCESSING_KEYS}, sort_keys=True, default=str)
            if key not in groups:
                groups[key] = _Pipeline(model.data, [])
            groups[key].models.append(model)
        self.pipelines = list(groups.values())

    @staticmethod
    def _model(item: SegModule | str | Path, data: Mapping[str, Any]) -> Model:
        if isinstance(item, SegModule):
            settings = dict(item.hparams)
            model = Model(name="module", settings=settings, module=item)
        else:
            model = model_from_checkpoint(item)
        if data:
            model.settings = {**model.settings, "data": dict(data)}
        return model

    def _check_weights(self) -> None:
        """Build each distinct network once and load each checkpoint's weights into it, so a checkpoint whose
        weights do not fit fails now, before any input is read."""
        for model in self.models:
            if model.module is None:
                self._use(model)

    @property
    def in_channels(self) -> int | None:
        """Image channels the networks expect, when their config says."""
        value = self.models[0].task()["in_channels"]
        return int(value) if isinstance(value, int) else None

    def _use(self, model: Model) -> SegModule:
        """The module that runs ``model`` on the device: its own module, or the shared network with its weights."""
        if model.module is not None:
            return model.module.to(self.device).eval()
        if self._module is None or self._network != model.network:
            self._module = None  # free the previous network first
            self._module = model.build().to(self.device)
            self._network = model.network
        elif self._loaded is not model:  # one model alone keeps its weights from case to case
            model.load_weights(self._module)
        self._loaded = model
        return self._module

    @torch.inference_mode()
    def probabilities(self, module: SegModule, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C, ...)`` of a preprocessed batch, by sliding window (and flips)."""
        image = image.to(self.device)
        flips = _flip_sets(image.ndim - 2) if self.tta else [()]
        total: torch.Tensor | None = None
        for dims in flips:
            x = torch.flip(image, dims) if dims else image
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = module.infer(x, self.inference)
            probs = module.probabilities(logits)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(flips)

    def predict_case(self, image: str | Sequence[str], keep_probabilities: bool = False) -> CasePrediction:
        """Segment one image file (or the channel files of one image) into a mask in its own geometry.

        Each model's probabilities are summed in its preprocessed grid (models that share preprocessing share
        one running sum), taken back to the scan's grid and averaged there.
        """
        paths = [str(image)] if isinstance(image, str | Path) else [str(p) for p in image]
        reference = load_nifti(paths[0])
        total: torch.Tensor | None = None
        module: SegModule | None = None
        for pipeline in self.pipelines:
            data = pipeline.preprocess({IMAGE: paths[0] if len(paths) == 1 else paths})
            x = data[IMAGE]
            if x.ndim != 4:
                raise DataError(f"{paths[0]}: a {x.ndim - 1}D image; the model segments 3D volumes")
            if self.in_channels is not None and x.shape[0] != self.in_channels:
                raise DataError(
                    f"{paths[0]}: the image has {x.shape[0]} channel(s) but the model was trained on "
                    f"{self.in_channels}"
                )
            batch = x.as_tensor()[None] if hasattr(x, "as_tensor") else x[None]
            running: torch.Tensor | None = None
            for model in pipeline.models:
                module = self._use(model)
                probs = self.probabilities(module, batch)[0]
                running = probs if running is None else running + probs
            assert running is not None
            # Invertd replays the image's recorded transforms backwards on a MetaTensor.
            data[PRED] = MetaTensor(running.cpu(), meta=dict(x.meta))
            restored = pipeline.invert(data)[PRED]
            restored = restored.as_tensor() if hasattr(restored, "as_tensor") else torch.as_tensor(restored)
            total = restored if total is None else total + restored
        assert total is not None and module is not None
        mean = total / len(self.models)
        if tuple(mean.shape[1:]) != tuple(reference.shape[:3]):
            raise RuntimeError(
                f"bug: the inverted prediction has shape {tuple(mean.shape[1:])}, the input {reference.shape[:3]}"
            )
        mask = module.labels(mean[None])[0, 0].numpy()
        mask = keep_largest_component(mask, self.largest_component)
        kept = mean.numpy().astype(np.float32) if keep_probabilities else None
        return CasePrediction(mask=mask, probabilities=kept, reference=reference)

    def describe(self) -> str:
        """One line: the models, the device and the window settings, for the log."""
        models = self.models[0].name if len(self.models) == 1 else f"an ensemble of {len(self.models)} models"
        extras = [f"overlap {self.inference['overlap']:.2f}"] if "overlap" in self.inference else []
        if self.inference.get("roi_size"):
            extras.append(f"window {self.inference['roi_size']}")
        if self.tta:
            extras.append("flip TTA")
        if self.largest_component:
            extras.append(f"largest component of labels {self.largest_component}")
        return f"{models} on {self.device}" + (f" ({', '.join(extras)})" if extras else "")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; a CUDA device without CUDA is a ConfigError."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={device}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA GPU is available here; use device=auto or device=cpu")
    return resolved


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of flipped spatial axes (batch dims), the unflipped one first: 8 for 3D."""
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def _like(reference: Any, array: np.ndarray) -> nib.Nifti1Image:
    """``array`` as a NIfTI image on ``reference``'s voxel grid: same affine and qform/sform codes."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(array, reference.affine)
    header = getattr(reference, "header", None)
    if isinstance(header, nib.Nifti1Header):
        # Viewers pick the sform or the qform by their codes; keep both as the scan has them.
        image.set_sform(reference.get_sform(), code=int(header["sform_code"]))
        image.set_qform(reference.get_qform(), code=int(header["qform_code"]))
        image.header.set_xyzt_units(*header.get_xyzt_units())
    return image


def predict_volume(
    model: SegModule | str | Path | Sequence[str | Path],
    image: str | Path | Sequence[str],
    data: Any = None,
    **options: Any,
) -> nib.Nifti1Image:
    """Segment one image file; the mask comes back as a NIfTI image in the scan's geometry.

    ``model`` is a SegModule (trained in this session, or loaded with ``SegModule.load_from_checkpoint``), a
    checkpoint file or run folder, or a list of them (an ensemble). ``data`` overrides the preprocessing the
    model carries (a SegDataModule, its settings, or a checkpoint file); a module built by hand without it uses
    the data module of the trainer it is attached to. ``options`` go to ``Predictor`` (``inference``, ``tta``,
    ``device``, ``largest_component``...).
    """
    if isinstance(model, SegModule):
        return _predict_with_module(model, image, data, **options)
    return Predictor(model_checkpoints(model), data=data, **options).predict_case(image).mask_image()


def _predict_with_module(module: SegModule, image: Any, data: Any, **options: Any) -> nib.Nifti1Image:
    """``predict_volume`` with a module in memory, which is left on its device and in its mode afterwards."""
    settings = data_settings(data) or dict(module.hparams.get("data") or {})
    if not settings:
        trainer = attached_trainer(module)
        settings = data_settings(getattr(trainer, "datamodule", None))
    if not settings:
        raise ConfigError(
            "predict_volume: the preprocessing is unknown: this module carries no data settings; pass "
            "data=<the SegDataModule or a checkpoint file>, or build the module with seglight.build"
        )
    device = next(module.parameters()).device
    was_training = module.training
    try:
        result = Predictor(module, data=settings, **options).predict_case(image)
    finally:
        module.to(device).train(was_training)
    return result.mask_image()
