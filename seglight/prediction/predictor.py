"""From checkpoints to masks in the scan's own geometry.

One model or an ensemble (the folds of a cross-validation), each loaded safely with the preprocessing it was
trained with; sliding-window inference with optional flip test-time augmentation; the probabilities of all
models averaged in the scan's voxel grid after inverting every spatial transform (orientation, resizing or
resampling) with MONAI's ``Invertd``; the module's own ``labels``; optional largest-component post-processing;
and NIfTI writing that keeps the input's shape and affine.
"""

from __future__ import annotations

import gzip
import inspect
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from seglight.core.errors import ConfigError, DataError, DiskFullError, find_user_error, first_line
from seglight.core.io import atomic_path, load_nifti
from seglight.core.utils import plain
from seglight.data.caching.files import hold
from seglight.data.datalists import IMAGE
from seglight.data.datamodule import PREPROCESSING_KEYS, prediction_settings
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote
from seglight.data.transforms import deterministic_transforms
from seglight.prediction.finished import case_stamp, is_finished, model_fingerprint, stamp
from seglight.prediction.inputs import InputCase, list_inputs
from seglight.prediction.postprocessing import keep_largest_component, largest_component_labels
from seglight.training.checkpoints import model_checkpoints, safe_load
from seglight.training.module import DEFAULT_INFERENCE, SegModule

log = logging.getLogger("seglight")

PRED = "pred"
# What the models of an ensemble must share: their probabilities are averaged channel by channel, and one
# threshold or argmax turns the mean into label values.
TASK_KEYS = ("in_channels", "out_channels", "label_names", "threshold")
INFERENCE_MODES = ("gaussian", "constant")


# -- models -------------------------------------------------------------------------------------------------------


@dataclass
class Model:
    """One model of a prediction: a module in memory, or a checkpoint's settings and weights kept on the CPU (memory
    mapped) until its turn, so an ensemble needs the memory of one network."""

    name: str  # the checkpoint file, or "module"
    settings: dict[str, Any]  # SegModule's constructor arguments (its hyperparameters)
    state_dict: Mapping[str, torch.Tensor] | None = None
    module: SegModule | None = None

    @property
    def data(self) -> dict[str, Any]:
        """The data settings that preprocess its input."""
        return dict(self.settings.get("data") or {})

    @property
    def network(self) -> str:
        """A key of the network config and compute switches: models with equal keys share one network."""
        return json.dumps(
            [self.settings.get("net"), self.settings.get("compute")], sort_keys=True, default=str
        )

    def task(self) -> dict[str, Any]:
        """What an ensemble's models must agree on (see ``TASK_KEYS``)."""
        net = self.settings.get("net") or {}
        names = self.settings.get("label_names") or {}
        return {
            "in_channels": net.get("in_channels"),
            "out_channels": net.get("out_channels", 1),
            "label_names": {int(k): str(v) for k, v in names.items()},
            "threshold": float(self.settings.get("threshold", 0.5)),
        }


def model_from_checkpoint(path: str | Path) -> Model:
    """A checkpoint file as a ``Model``, read safely (``seglight.training.checkpoints.safe_load``), weights left on disk."""
    checkpoint = safe_load(path, mmap=True)
    hparams = plain(checkpoint.get("hyper_parameters"))
    if not isinstance(hparams, Mapping) or "net" not in hparams:
        raise ConfigError(
            f"ckpt={path}: not a seglight checkpoint (its hyper_parameters have no network config 'net')"
        )
    # As Lightning's load_from_checkpoint does: pass the saved hyperparameters the constructor takes.
    parameters = inspect.signature(SegModule.__init__).parameters
    settings = {k: v for k, v in hparams.items() if k in parameters and k != "self"}
    if not settings.get("data"):  # saved by older versions beside the module, as the data module's settings
        settings["data"] = prediction_settings(checkpoint.get("datamodule_hyper_parameters") or {})
    if not settings["data"]:
        log.warning(
            "ckpt=%s has no saved data settings: using SegDataModule's defaults for the preprocessing", path
        )
    return Model(name=str(path), settings=settings, state_dict=checkpoint["state_dict"])


def load_module(path: str | Path) -> SegModule:
    """A SegModule on the CPU in eval mode, from a checkpoint file read safely; it carries its data settings."""
    model = model_from_checkpoint(path)
    return _build(model)


def _build(model: Model) -> SegModule:
    """The module of a checkpoint model, with its weights (a ConfigError when they do not fit its config)."""
    module = SegModule(**model.settings)
    try:
        module.load_state_dict(dict(model.state_dict or {}), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"ckpt={model.name}: the weights do not fit the saved network config ({first})"
        ) from None
    return module.eval()


def data_settings(data: Any) -> dict[str, Any]:
    """Prediction settings from a SegDataModule, a mapping of its settings, or a checkpoint file; {} for None."""
    if data is None:
        return {}
    if isinstance(data, str | Path):
        return model_from_checkpoint(data).data
    if callable(getattr(data, "prediction_settings", None)):
        return data.prediction_settings()
    if isinstance(data, Mapping):
        return prediction_settings(data)
    raise ConfigError(
        f"data: expected a SegDataModule, a mapping of its settings or a checkpoint, got {data!r}"
    )


def check_agreement(models: Sequence[Model]) -> None:
    """ConfigError unless every model of an ensemble has the same channels, labels and threshold."""
    first = models[0].task()
    for other in models[1:]:
        task = other.task()
        for key in TASK_KEYS:
            if task[key] != first[key]:
                raise ConfigError(
                    f"ckpt: the models disagree on {key}: {models[0].name} has {first[key]}, {other.name} has "
                    f"{task[key]}; an ensemble averages models trained for the same labels and image channels"
                )


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


# -- the predictor ------------------------------------------------------------------------------------------------


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
            self._module = _build(model).to(self.device)
            self._network = model.network
        elif self._loaded is not model:  # one model alone keeps its weights from case to case
            try:
                self._module.load_state_dict(dict(model.state_dict or {}), strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ConfigError(
                    f"ckpt={model.name}: the weights do not fit the saved network config ({first})"
                ) from None
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


def preprocessing(data: Mapping[str, Any]) -> list[mt.Transform]:
    """The deterministic training transforms for images only, with the saved settings.

    The saved settings are matched by name to ``deterministic_transforms``' parameters, so options added to the
    pipeline later are picked up without changes here.
    """
    parameters = inspect.signature(deterministic_transforms).parameters
    kwargs = {k: v for k, v in data.items() if k in parameters}
    kwargs.update(image_key=IMAGE, label_key=None)
    return deterministic_transforms(**kwargs)


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


# -- inputs and outputs ------------------------------------------------------------------------------------------


def _localize(image: str | list[str], store: RemoteCache) -> str | list[str]:
    """The case's files, with remote ones fetched into the cache."""
    if isinstance(image, list):
        return [str(_localize(p, store)) for p in image]
    return str(store.fetch(image)) if is_remote(image) else image


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


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write ``image`` atomically (``seglight.core.io.atomic_path``): no half-written mask is ever left.

    On a full disk, the message gives the size of the compressed image (computed only then).
    """
    with atomic_path(path, size_hint=lambda: len(gzip.compress(image.to_bytes(), compresslevel=1))) as tmp:
        nib.save(image, tmp)


@dataclass
class PredictionReport:
    """What a prediction run wrote and what it could not do."""

    output: Path
    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # case -> what went wrong, naming the file
    # Masks that an earlier run of the same prediction finished, kept.
    kept: dict[str, Path] = field(default_factory=dict)

    def raise_for_failures(self) -> None:
        """A DataError naming every input that could not be predicted, if any."""
        if not self.failed:
            return
        total = len(self.failed) + len(self.written) + len(self.kept)
        lines = "\n  ".join(self.failed.values())
        raise DataError(f"{len(self.failed)} of {total} input(s) could not be predicted:\n  {lines}")


def predict_cases(
    predictor: Predictor,
    cases: Sequence[InputCase],
    output: str | Path,
    save_probabilities: bool = False,
    store: RemoteCache | None = None,
    overwrite: bool = False,
) -> PredictionReport:
    """Predict each case into ``output/<case>.nii.gz`` (and ``output/probabilities/``), one failure at a time.

    A case that cannot be read or used is logged and recorded, and the others are still predicted. A mask that
    an earlier run of the same prediction finished is kept (see ``seglight.prediction.finished``), unless
    ``overwrite``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = PredictionReport(output=output)
    store = store or RemoteCache()
    fingerprint = prediction_fingerprint(predictor)
    for number, case in enumerate(cases, start=1):
        started = time.perf_counter()
        target = output / f"{case.case_id}.nii.gz"
        probability_file = output / "probabilities" / f"{case.case_id}.nii.gz"
        try:
            image = _localize(case.image, store)
            case_mark = case_stamp(fingerprint, image)
            if not overwrite and is_finished(
                target, case_mark, [probability_file] if save_probabilities else []
            ):
                report.kept[case.case_id] = target
                log.info("[%d/%d] %s: kept %s (finished earlier)", number, len(cases), case.case_id, target)
                continue
            result = predictor.predict_case(image, keep_probabilities=save_probabilities)
        except Exception as exc:  # one bad scan (unreadable, too large for memory...) must not stop the rest
            user_error = find_user_error(exc)  # MONAI's Compose wraps the DataError our loader raises
            if isinstance(user_error, DiskFullError):
                raise user_error from None  # every further case would fail the same way
            if user_error is not None:
                why = first_line(user_error)  # it names the file
                log.error("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            else:
                why = f"{case.first_file}: {type(exc).__name__}: {first_line(exc)}"
                log.exception("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            report.failed[case.case_id] = why
            continue
        probabilities = result.probability_image()
        if probabilities is not None:  # before the mask: a mask in place means its case is complete
            save_nifti(probabilities, probability_file)
        save_nifti(stamp(result.mask_image(), case_mark), target)
        report.written[case.case_id] = target
        found = ", ".join(str(v) for v in np.unique(result.mask) if v != 0) or "none"
        log.info(
            "[%d/%d] %s: %s -> %s (labels: %s, %.1f s)",
            number,
            len(cases),
            case.case_id,
            "x".join(map(str, result.mask.shape)),
            target,
            found,
            time.perf_counter() - started,
        )
    return report


def prediction_fingerprint(predictor: Predictor) -> str | None:
    """What ``predictor`` computes (its checkpoints and options), for telling a rerun's finished masks."""
    options = {
        "inference": predictor.inference,
        "tta": predictor.tta,
        "amp": predictor.amp,
        "largest_component": predictor.largest_component,
        "data": [model.data for model in predictor.models],
    }
    return model_fingerprint([model.name for model in predictor.models], options)


def predict(
    ckpt: str | Path | Sequence[str | Path],
    input: str | Path,  # noqa: A002 - the command-line name
    output: str | Path,
    inference: Mapping[str, Any] | None = None,
    tta: bool = False,
    save_probabilities: bool = False,
    device: str = "auto",
    amp: bool = True,
    largest_component: Any = False,
    datalist_key: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    image_pattern: str | Sequence[str] | None = None,
    overwrite: bool = False,
) -> PredictionReport:
    """Segment every image of ``input`` with the model(s) of ``ckpt`` into ``output`` (see ``seglight.predict``).

    ``ckpt`` is a checkpoint file, a run folder, a folder of runs (the folds of a cross-validation) or a list of
    these; several models are an ensemble whose probabilities are averaged. Masks that an earlier run of the
    same prediction finished in ``output`` are kept, unless ``overwrite``.
    """
    predictor = Predictor(
        model_checkpoints(ckpt),
        inference=inference,
        tta=tta,
        device=device,
        amp=amp,
        largest_component=largest_component,
    )
    store = RemoteCache(
        cache_dir=Path(cache_dir).expanduser() / "remote" if cache_dir else default_cache_dir() / "remote",
        endpoint_url=endpoint_url,
    )
    settings = dict(predictor.models[0].data)
    if image_pattern is not None:  # subject folders laid out otherwise than the training data
        settings.update(layout="folder", image_pattern=image_pattern)
    listed = list_inputs(input, settings, datalist_key, store, channels=predictor.in_channels)
    cases = [case for case in listed if case.problem is None]
    if any(
        is_remote(f) for case in cases for f in ([case.image] if isinstance(case.image, str) else case.image)
    ):
        hold(store.cache_dir)  # a cache prune meanwhile keeps the scans this prediction fetches
    _check_no_overwrite(cases, Path(output))
    log.info("Predicting %d image(s) with %s", len(cases), predictor.describe())
    report = predict_cases(predictor, cases, output, save_probabilities, store, overwrite=overwrite)
    for case in listed:
        if case.problem is not None:  # a subject folder without a channel, say: named, the others written
            log.error("%s: FAILED: %s", case.case_id, case.problem)
            report.failed[case.case_id] = case.problem
    return report


def _check_no_overwrite(cases: Sequence[InputCase], output: Path) -> None:
    """ConfigError when a mask would replace one of the input images (output= the input folder, say)."""
    for case in cases:
        files = [case.image] if isinstance(case.image, str) else case.image
        target = (output / f"{case.case_id}.nii.gz").expanduser().resolve()
        if any(not is_remote(f) and Path(f).resolve() == target for f in files):
            raise ConfigError(
                f"output={output}: the mask {target.name} would overwrite the input image {target}"
            )


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
        trainer = getattr(module, "_trainer", None)
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
