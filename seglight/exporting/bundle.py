"""MONAI bundles: a checkpoint as a folder that ``python -m monai.bundle run`` runs with only MONAI installed.

``configs/inference.json`` holds the preprocessing that ``seglight.predict`` applies, described from the very
transform objects it builds (``seglight.prediction.predictor.preprocessing``), not restated: a transform seglight
cannot describe stops the export, and the described pipeline is run against seglight's on a test scan before
anything is written. Then the same inference (one pass, or sliding windows with the trained settings and those
``seglight.predict`` adds), the activation, the inversion of the probabilities back to the scan's grid (MONAI's
``Invertd``), the threshold or argmax, and masks saved as ``<case>.nii.gz`` as ``seglight.predict`` names them.
The loop is plain MONAI and PyTorch (no ignite). ``configs/metadata.json`` follows MONAI's metadata schema
(``meta_schema_20240725.json``, kept in ``schemas/`` for checks without a download); ``models/model.pt`` is the
network's state dict; ``docs/README.md`` says how to run it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt

from seglight.core.errors import ConfigError, SeglightError, first_line
from seglight.core.io import atomic_write_text, partial_path
from seglight.data.datalists import IMAGE
from seglight.data.normalization import SEGLIGHT_ONLY
from seglight.data.transforms import STEPS, monai_call
from seglight.exporting.bundle_metadata import bundle_labels, bundle_metadata, readme
from seglight.exporting.formats import checkpoint_file, load_trained, plain_network, trained_size
from seglight.models.networks import class_name
from seglight.prediction.models import preprocessing
from seglight.prediction.predictor import PRED, inference_settings

log = logging.getLogger("seglight")

# MONAI's bundle metadata schema, verbatim (Project-MONAI/project-monai.github.io, public/schema/, a copy of the
# MONAI-extra-test-data 0.8.1 release asset that metadata.json names): verify_metadata reads it from here, offline.
SCHEMA_FILE = Path(__file__).parent / "schemas" / "meta_schema_20240725.json"
# That file as published: verify_metadata checks it before use.
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
MODEL_FILE = "models/model.pt"
# What monai.bundle reads from configs/logging.conf: INFO lines on stdout (the file each mask is written to).
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass
class BundleResult:
    """The bundle folder an export wrote, and its two configs."""

    folder: Path
    metadata: dict[str, Any]
    inference: dict[str, Any]


def export_bundle(
    ckpt: str | Path, output: str | Path | None = None, inference: Mapping[str, Any] | None = None
) -> BundleResult:
    """Write ``ckpt`` as a MONAI bundle folder (replacing a bundle already there), checked before it is moved in.

    Args:
        ckpt: a checkpoint written by seglight training.
        output: the bundle folder; default: ``<run>/export/<checkpoint>_bundle`` for a run's checkpoint, else
            ``<checkpoint>_bundle`` beside it.
        inference: sliding-window settings as ``seglight.predict`` takes them (``inference.*``), over the
            trained ones.
    """
    path = checkpoint_file(ckpt)
    folder = bundle_folder(path, output)
    module, data = load_trained(path)
    net_config = dict(module.hparams.net)
    if not str(net_config.get("_target_", "")).startswith("monai."):
        raise ConfigError(
            f"format=bundle: the network {net_config.get('_target_')} is not a MONAI class, so a bundle could not "
            "build it with only MONAI installed; use format=torchscript"
        )
    settings = dict(module.hparams.data or {})
    window = {**dict(module.hparams.inference), **inference_settings(inference)}
    out_channels = int(net_config.get("out_channels", 1))
    labels = bundle_labels(module.hparams.label_names or {}, out_channels)
    size = trained_size(module, data)
    config = inference_config(settings, window, net_config, out_channels, float(module.hparams.threshold))
    metadata = bundle_metadata(path, net_config, labels, size, settings, window)
    network = plain_network(module)

    partial = partial_path(folder)
    try:
        _write(partial, config, metadata, network, labels, size, window)
        check_preprocessing(partial / "configs" / "inference.json", settings)
        check_metadata(partial / "configs" / "metadata.json")
        _replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("MONAI bundle of %s written to %s", class_name(net_config), folder)
    return BundleResult(folder=folder, metadata=metadata, inference=config)


def bundle_folder(ckpt: Path, output: str | Path | None) -> Path:
    """The folder to write; an existing folder that holds something other than a bundle is a ConfigError."""
    stem = ckpt.name[: -len(".ckpt")] if ckpt.name.endswith(".ckpt") else ckpt.name
    if output is None or str(output) == "":
        parent = ckpt.expanduser().resolve().parent
        return (parent.parent / "export" if parent.name == "checkpoints" else parent) / f"{stem}_bundle"
    target = Path(output).expanduser().resolve()
    if target.is_file():
        raise ConfigError(f"output={output}: an existing file; format=bundle writes a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "configs" / "metadata.json").is_file():
        raise ConfigError(f"output={output}: a folder that holds other files; give a new or empty folder")
    return target


# -- configs ---------------------------------------------------------------------------------------------------


def inference_config(
    settings: Mapping[str, Any],
    window: Mapping[str, Any],
    net_config: Mapping[str, Any],
    out_channels: int,
    threshold: float,
) -> dict[str, Any]:
    """``configs/inference.json``: read each scan of ``dataset_dir``, segment it as seglight.predict does, save it."""
    steps = [transform_config(t) for t in preprocessing(settings)]
    if window.get("roi_size"):
        inferer: dict[str, Any] = {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(s) for s in window["roi_size"]],
            "sw_batch_size": int(window["sw_batch_size"]),
            "overlap": float(window["overlap"]),
            "mode": str(window["mode"]),
        }
    else:
        inferer = {"_target_": "SimpleInferer"}
    if out_channels == 1:
        activation = {"_target_": "Activationsd", "keys": PRED, "sigmoid": True}
        # seglight's rule is strictly above the threshold (AsDiscreted's is at or above it).
        to_labels = {"_target_": "Lambdad", "keys": PRED, "func": f"$lambda p: p > {threshold!r}"}
    else:
        activation = {"_target_": "Activationsd", "keys": PRED, "softmax": True}
        to_labels = {"_target_": "AsDiscreted", "keys": PRED, "argmax": True}
    dtype = "uint8" if out_channels <= 256 else "int16"
    return {
        "imports": ["$import collections", "$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        # Every .nii.gz and .nii of dataset_dir, hidden files left out, as seglight lists a folder.
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
        "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {**json.loads(json.dumps(dict(net_config), default=_plain_value))},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "inferer": inferer,
        # Half precision on CUDA, as seglight.predict's amp=true; logits in float32 before the activation.
        "infer": "$torch.autocast(@device.type, dtype=torch.float16, enabled=@device.type == 'cuda')"
        "(lambda x: @inferer(x, @network))",
        "predict": "$lambda image: monai.data.MetaTensor(@infer(image.as_tensor()[None].to(@device))[0]"
        ".float().cpu(), meta=dict(image.meta))",
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                activation,
                {
                    "_target_": "Invertd",
                    "keys": PRED,
                    "transform": "@preprocessing",
                    "orig_keys": IMAGE,
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                to_labels,
                {
                    "_target_": "SaveImaged",
                    "keys": PRED,
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_ext": ".nii.gz",
                    "separate_folder": False,
                    "resample": False,
                    "output_dtype": f"$numpy.{dtype}",
                    "print_log": True,
                },
            ],
        },
        "segment": "$lambda path: @postprocessing({**(d := @preprocessing({'image': path})), "
        "'pred': @predict(d['image'])})",
        "load_weights": "$@network.load_state_dict(torch.load(os.path.join(@bundle_root, "
        f"'{MODEL_FILE}'), map_location=@device, weights_only=True))",
        "initialize": ["$torch.set_grad_enabled(False)", "$@load_weights", "$@network.eval()"],
        # One scan at a time, nothing kept: a deque of length 0 consumes the generator.
        "run": ["$collections.deque((@segment(path) for path in @datalist), maxlen=0)"],
    }


def transform_config(transform: mt.Transform) -> dict[str, Any]:
    """A bundle config entry that builds ``transform`` again: the MONAI call the export JSON describes it by
    (``seglight.data.transforms.monai_call``), in the bundle's syntax; SeglightError for a transform that is not
    a step of prediction's preprocessing or has no MONAI class to build it."""
    if isinstance(transform, SEGLIGHT_ONLY):
        raise SeglightError(
            f"format=bundle: data.normalize needs seglight's own {type(transform).__name__} here (a mode per "
            "channel, or ct clip ranges that differ between channels), which a bundle cannot build with MONAI "
            "alone; export format=torchscript"
        )
    monai_class, settings = monai_call(transform)
    if type(transform) not in STEPS or not monai_class.__module__.startswith("monai."):
        raise SeglightError(
            f"format=bundle: seglight cannot describe its {type(transform).__name__} transform in a bundle yet"
        )
    entry = {"_target_": monai_class.__name__, "keys": list(transform.keys)}
    return {**entry, **{name: bundle_value(name, value) for name, value in settings.items()}}


def bundle_value(name: str, value: Any) -> Any:
    """A described setting in the bundle's syntax: a dtype (``float32``, ``torch.float16``) as the expression
    that makes it (``$numpy.float32``, ``$torch.float16``); the others as they are."""
    if name == "dtype" and isinstance(value, str):
        module, _, dtype = value.rpartition(".")
        return f"$torch.{dtype}" if module == "torch" else f"$numpy.{dtype}"
    return value


def _plain_value(value: Any) -> Any:
    """A network setting as JSON: sequences as lists, NaN as null, numpy scalars as numbers, enums by value."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain_value(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "value") and type(value).__module__.startswith("monai"):
        return value.value  # a MONAI enum (Act, Norm...)
    return value


# -- writing and checking ----------------------------------------------------------------------------------------


def _write(
    folder: Path,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
    network: torch.nn.Module,
    labels: Mapping[int, str],
    size: list[int],
    window: Mapping[str, Any],
) -> None:
    (folder / "models").mkdir(parents=True)
    atomic_write_text(folder / "configs" / "inference.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(folder / "configs" / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    torch.save(network.state_dict(), folder / MODEL_FILE)
    atomic_write_text(folder / "configs" / "logging.conf", LOGGING_CONF)
    atomic_write_text(folder / "docs" / "README.md", readme(metadata, labels, size, window))


def check_preprocessing(config_file: Path, settings: Mapping[str, Any]) -> None:
    """SeglightError unless the bundle's preprocessing turns a test scan into exactly what seglight's does."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    bundle = parser.get_parsed_content("preprocessing")
    ours = mt.Compose(preprocessing(settings))
    with tempfile.TemporaryDirectory() as tmp:
        scan = os.path.join(tmp, "scan.nii.gz")
        affine = np.array([[0.0, -0.9, 0.1, 10.0], [1.1, 0.0, 0.0, -5.0], [0.0, 0.1, 2.4, 3.0], [0, 0, 0, 1]])
        values = np.random.default_rng(0).normal(0.0, 400.0, size=(23, 19, 11)).astype(np.float32)
        nib.save(nib.Nifti1Image(values, affine), scan)
        try:
            got, want = bundle({IMAGE: scan})[IMAGE], ours({IMAGE: scan})[IMAGE]
        except Exception as exc:  # a setting MONAI refuses: the description is wrong
            raise SeglightError(
                f"format=bundle: the bundle's preprocessing fails ({first_line(exc)})"
            ) from None
    same = (
        got.shape == want.shape
        and torch.equal(got.as_tensor(), want.as_tensor())
        and torch.allclose(got.affine, want.affine)
        and [op["class"] for op in got.applied_operations] == [op["class"] for op in want.applied_operations]
    )
    if not same:
        raise SeglightError(
            "format=bundle: the bundle's preprocessing does not reproduce seglight's on a test scan; nothing written"
        )


def check_metadata(meta_file: Path) -> None:
    """Validate ``metadata.json`` against MONAI's schema (``monai.bundle.verify_metadata``) where jsonschema is
    installed."""
    try:
        import jsonschema  # noqa: F401 - monai.bundle.verify_metadata needs it
    except ImportError:
        log.info("jsonschema is not installed: metadata.json was not checked against MONAI's schema")
        return
    from monai.bundle import verify_metadata

    # MONAI logs its arguments and the schema file's check at INFO: not news to someone exporting.
    loggers = [logging.getLogger(name) for name in ("monai.bundle.scripts", "monai.apps")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        verify_metadata(
            meta_file=str(meta_file), filepath=str(SCHEMA_FILE), create_dir=False, hash_val=SCHEMA_MD5
        )
    except ValueError as exc:
        raise SeglightError(
            f"format=bundle: metadata.json does not follow MONAI's schema ({first_line(exc)})"
        ) from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _replace(partial: Path, folder: Path) -> None:
    """Move the finished bundle into place; a bundle already there is replaced (removed once the new one is in)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = partial_path(folder) if folder.exists() else None
    if old is not None:
        folder.rename(old)
    partial.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
