"""From a checkpoint to masks in the scan's own geometry.

Safe checkpoint loading, the preprocessing rebuilt from the settings saved in the checkpoint, sliding-window
inference with optional flip test-time augmentation, inversion of every spatial transform (orientation,
resizing or resampling) with MONAI's ``Invertd``, and NIfTI writing that keeps the input's shape and affine.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import os
import pathlib
import pickle
import re
import time
import typing
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from seglight.data.datalists import IMAGE
from seglight.data.inputs import InputCase, list_inputs
from seglight.data.remote import RemoteCache, default_cache_dir, is_remote
from seglight.data.transforms import deterministic_transforms
from seglight.errors import ConfigError, DataError, find_user_error
from seglight.module import SegModule

log = logging.getLogger("seglight")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PRED = "pred"


# -- safe checkpoint loading -----------------------------------------------------------------------------------


def _safe_globals() -> list[Any]:
    """Classes a benign Lightning checkpoint may reference besides tensors and plain containers.

    Hyperparameters saved from OmegaConf objects (a notebook passing ``cfg.data.demo`` straight to the data
    module, say) pickle as these classes and the builtin types they record. Constructing any of them runs no
    code from the file, so they are allowed one by one instead of turning the protection off.
    """
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        BytesNode,
        FloatNode,
        IntegerNode,
        PathNode,
        StringNode,
        typing.Any,
        dict,
        list,
        tuple,
        set,
        int,
        float,
        str,
        bool,
        bytes,
        collections.defaultdict,
        collections.OrderedDict,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    ]


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, nothing in the file can run code.

    A file that needs more (a pickled function call, an arbitrary class) is refused with a ConfigError that
    names what it asked for.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt={path}: no such checkpoint file")
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
            with torch.serialization.safe_globals(_safe_globals()):
                checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        else:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted is None:  # not a pickle PyTorch can read at all
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            why = detail.group(1).strip() if detail else "not a PyTorch pickle"
            raise ConfigError(f"ckpt={path}: not a readable PyTorch checkpoint ({why})") from None
        raise ConfigError(
            f"ckpt={path}: refused: loading it would run code from the file (it references {wanted.group(1)}), "
            "and seglight loads checkpoints with PyTorch's weights_only=True, which allows only tensors and "
            "plain settings. Use a checkpoint written by seglight training; if you trust this file, load it "
            "yourself and re-save its state_dict and hyper_parameters as plain data."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"ckpt={path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt={path}: not a Lightning checkpoint (it has no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "net" not in hparams:
        raise ConfigError(
            f"ckpt={path}: not a seglight checkpoint (its hyper_parameters have no network config 'net')"
        )
    return dict(checkpoint)


@dataclass
class LoadedCheckpoint:
    """A SegModule with its weights and the preprocessing settings it was trained with."""

    module: SegModule
    data: dict[str, Any]
    path: Path | None = None


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a seglight checkpoint safely (see ``safe_load``) into a SegModule on the CPU, in eval mode."""
    checkpoint = safe_load(path)
    hparams = _plain(checkpoint["hyper_parameters"])
    # As Lightning's load_from_checkpoint does: pass the saved hyperparameters the constructor takes.
    parameters = inspect.signature(SegModule.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in hparams.items() if takes_any or k in parameters}
    module = SegModule(**kwargs)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"ckpt={path}: the weights do not fit the saved network config ({exc})") from None
    module.eval()
    data = _plain(checkpoint.get("datamodule_hyper_parameters") or {})
    if not data:
        log.warning(
            "ckpt=%s has no saved data settings: using SegDataModule's defaults for the preprocessing", path
        )
    return LoadedCheckpoint(module=module, data=dict(data), path=Path(path))


def data_settings(data: Any) -> dict[str, Any]:
    """Preprocessing settings from a SegDataModule, a mapping of its settings, or a checkpoint path."""
    if data is None:
        return {}
    if isinstance(data, str | Path):
        return dict(_plain(safe_load(data).get("datamodule_hyper_parameters") or {}))
    hparams = getattr(data, "hparams", None)
    if hparams is not None and not isinstance(data, Mapping):
        return dict(_plain(dict(hparams)))
    if isinstance(data, Mapping):
        return dict(_plain(dict(data)))
    raise ConfigError(
        f"data: expected a SegDataModule, a mapping of its settings or a checkpoint, got {data!r}"
    )


# -- the predictor ----------------------------------------------------------------------------------------------


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


class Predictor:
    """Segments images with a trained SegModule, undoing the preprocessing so masks fit the scans.

    Args:
        module: the trained module (its ``net``, ``threshold`` and output channels are used).
        data: the data settings it was trained with (``SegDataModule`` hyperparameters).
        roi: sliding-window size; default the training input size (patch size in patch mode).
        overlap: overlap of neighbouring windows (0..1).
        sw_batch_size: windows run through the network at once.
        tta: also predict on the images flipped along each combination of spatial axes, and average.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: half precision on CUDA.
    """

    def __init__(
        self,
        module: SegModule,
        data: Mapping[str, Any] | None = None,
        roi: Sequence[int] | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        tta: bool = False,
        device: str = "auto",
        amp: bool = True,
    ) -> None:
        self.data = dict(data or {})
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        trained_window = (module.hparams.get("inference") or {}).get("roi_size")
        self.roi = [int(s) for s in (roi or trained_window or default_roi(self.data))]
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ConfigError(f"roi must be three positive sizes (x, y, z), got {list(self.roi)}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError(f"overlap must be at least 0 and below 1, got {overlap}")
        self.inferer = SlidingWindowInferer(
            roi_size=self.roi, sw_batch_size=int(sw_batch_size), overlap=float(overlap), mode="gaussian"
        )
        self.tta = bool(tta)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.preprocess = mt.Compose(preprocessing(self.data))
        # Probabilities go back with linear interpolation and are thresholded afterwards, in the scan's grid.
        self.invert = mt.Invertd(keys=PRED, transform=self.preprocess, orig_keys=IMAGE, nearest_interp=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> Predictor:
        """A predictor for a checkpoint file, loaded safely."""
        loaded = load_checkpoint(path)
        return cls(loaded.module, loaded.data, **options)

    @property
    def in_channels(self) -> int | None:
        """Image channels the network expects, when its config says."""
        value = self.module.hparams.net.get("in_channels")
        return int(value) if isinstance(value, int) else None

    @torch.inference_mode()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, C, ...)`` of a preprocessed batch, by sliding window (and flips)."""
        image = image.to(self.device)
        flips = _flip_sets(image.ndim - 2) if self.tta else [()]
        total: torch.Tensor | None = None
        for dims in flips:
            x = torch.flip(image, dims) if dims else image
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.inferer(x, self.module)
            probs = activate(logits.float())
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(flips)

    def labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Label values from ``(C, ...)`` probabilities: threshold for one channel, argmax for several."""
        if probabilities.shape[0] == 1:
            return (probabilities[0] > float(self.module.hparams.threshold)).to(torch.uint8)
        return torch.argmax(probabilities, dim=0).to(
            torch.uint8 if probabilities.shape[0] <= 256 else torch.int16
        )

    def predict_case(self, image: str | Sequence[str], keep_probabilities: bool = False) -> CasePrediction:
        """Segment one image file (or the channel files of one image) into a mask in its own geometry."""
        paths = [str(image)] if isinstance(image, str | Path) else [str(p) for p in image]
        data = self.preprocess({IMAGE: paths[0] if len(paths) == 1 else paths})
        x = data[IMAGE]
        if x.ndim != 4:
            raise DataError(f"{paths[0]}: a {x.ndim - 1}D image; the model segments 3D volumes")
        if self.in_channels is not None and x.shape[0] != self.in_channels:
            raise DataError(
                f"{paths[0]}: the image has {x.shape[0]} channel(s) but the model was trained on {self.in_channels}"
            )
        probs = self.probabilities(x.as_tensor()[None] if hasattr(x, "as_tensor") else x[None])[0].cpu()
        # Invertd replays the image's recorded transforms backwards on a MetaTensor.
        data[PRED] = MetaTensor(probs, meta=dict(x.meta))
        restored = self.invert(data)[PRED]
        restored = restored.as_tensor() if hasattr(restored, "as_tensor") else torch.as_tensor(restored)
        reference = nib.load(paths[0])
        if tuple(restored.shape[1:]) != tuple(reference.shape[:3]):
            raise RuntimeError(
                f"bug: the inverted prediction has shape {tuple(restored.shape[1:])}, the input {reference.shape[:3]}"
            )
        mask = self.labels(restored).numpy()
        kept = restored.numpy().astype(np.float32) if keep_probabilities else None
        return CasePrediction(mask=mask, probabilities=kept, reference=reference)


def activate(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax over channels otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def preprocessing(data: Mapping[str, Any]) -> list[mt.Transform]:
    """The deterministic training transforms for images only, with the saved settings.

    The saved settings are matched by name to ``deterministic_transforms``' parameters, so options added to the
    pipeline later (resampling to a target spacing, say) are picked up without changes here.
    """
    parameters = inspect.signature(deterministic_transforms).parameters
    kwargs = {k: v for k, v in data.items() if k in parameters}
    kwargs.update(image_key=IMAGE, label_key=None)
    return deterministic_transforms(**kwargs)


def default_roi(data: Mapping[str, Any]) -> list[int]:
    """The window the network was trained on: the patch size in patch mode, else ``spatial_size``."""
    if str(data.get("mode", "resize")) == "patch" and data.get("patch_size"):
        return [int(s) for s in data["patch_size"]]
    return [int(s) for s in data.get("spatial_size") or (128, 128, 64)]


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
    """Write ``image`` through a temporary file and a rename, so no half-written mask is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.nii.gz")  # nibabel picks the format by suffix
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class PredictionReport:
    """What a prediction run wrote and what it could not do."""

    output: Path
    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # case -> what went wrong, naming the file

    def raise_for_failures(self) -> None:
        """A DataError naming every input that could not be predicted, if any."""
        if not self.failed:
            return
        total = len(self.failed) + len(self.written)
        lines = "\n  ".join(self.failed.values())
        raise DataError(f"{len(self.failed)} of {total} input(s) could not be predicted:\n  {lines}")


def predict_cases(
    predictor: Predictor,
    cases: Sequence[InputCase],
    output: str | Path,
    save_probabilities: bool = False,
    store: RemoteCache | None = None,
) -> PredictionReport:
    """Predict each case into ``output/<case>.nii.gz`` (and ``output/probabilities/``), one failure at a time.

    A case that cannot be read or used is logged and recorded, and the others are still predicted.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = PredictionReport(output=output)
    store = store or RemoteCache()
    for number, case in enumerate(cases, start=1):
        started = time.perf_counter()
        try:
            image = _localize(case.image, store)
            result = predictor.predict_case(image, keep_probabilities=save_probabilities)
        except Exception as exc:  # one bad scan (unreadable, too large for memory...) must not stop the rest
            user_error = find_user_error(exc)  # MONAI's Compose wraps the DataError our loader raises
            if user_error is not None:
                why = _first_line(user_error)  # it names the file
                log.error("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            else:
                why = f"{case.first_file}: {type(exc).__name__}: {_first_line(exc)}"
                log.exception("[%d/%d] %s: FAILED: %s", number, len(cases), case.case_id, why)
            report.failed[case.case_id] = why
            continue
        target = output / f"{case.case_id}.nii.gz"
        save_nifti(result.mask_image(), target)
        probabilities = result.probability_image()
        if probabilities is not None:
            save_nifti(probabilities, output / "probabilities" / f"{case.case_id}.nii.gz")
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


def predict(
    ckpt: str | Path,
    input: str | Path,  # noqa: A002 - the command-line name
    output: str | Path,
    roi: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    tta: bool = False,
    save_probabilities: bool = False,
    device: str = "auto",
    amp: bool = True,
    datalist_key: str | None = None,
    cache_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    image_pattern: str | Sequence[str] | None = None,
) -> PredictionReport:
    """Segment every image of ``input`` with the checkpoint ``ckpt`` into ``output`` (see ``seglight.predict``)."""
    loaded = load_checkpoint(ckpt)
    store = RemoteCache(
        cache_dir=Path(cache_dir).expanduser() / "remote" if cache_dir else default_cache_dir() / "remote",
        endpoint_url=endpoint_url,
    )
    settings = dict(loaded.data)
    if image_pattern is not None:  # subject folders laid out otherwise than the training data
        settings.update(layout="folder", image_pattern=image_pattern)
    in_channels = loaded.module.hparams.net.get("in_channels")
    listed = list_inputs(
        input, settings, datalist_key, store, channels=in_channels if isinstance(in_channels, int) else None
    )
    cases = [case for case in listed if case.problem is None]
    _check_no_overwrite(cases, Path(output))
    predictor = Predictor(
        loaded.module,
        loaded.data,
        roi=roi,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        tta=tta,
        device=device,
        amp=amp,
    )
    log.info(
        "Predicting %d image(s) with %s on %s (window %s, overlap %.2f%s)",
        len(cases),
        ckpt,
        predictor.device,
        predictor.roi,
        float(overlap),
        ", flip TTA" if tta else "",
    )
    report = predict_cases(predictor, cases, output, save_probabilities, store)
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
    module: SegModule, image: str | Path | Sequence[str], data: Any = None, **options: Any
) -> nib.Nifti1Image:
    """Segment one image file with ``module``; the mask comes back as a NIfTI image in the scan's geometry.

    ``data`` gives the preprocessing the module was trained with: a SegDataModule, its settings, or a checkpoint
    file; by default the data module of the trainer the module is attached to.
    """
    settings = data_settings(data)
    if not settings:
        trainer = getattr(module, "_trainer", None)
        settings = data_settings(getattr(trainer, "datamodule", None))
    if not settings:
        raise ConfigError(
            "predict_volume: the preprocessing is unknown: pass data=<the SegDataModule or checkpoint file> "
            "(a module loaded with load_from_checkpoint carries only the network)"
        )
    device = next(module.parameters()).device
    was_training = module.training
    try:
        result = Predictor(module, settings, **options).predict_case(image)
    finally:
        module.to(device).train(was_training)
    return result.mask_image()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (hyperparameters may hold either)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
