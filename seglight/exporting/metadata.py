"""The JSON that travels with an exported model: what it takes and returns, and how to prepare the one and read
the other.

Written beside the model file (``<model file>.json``) and into it (a TorchScript extra file, ONNX metadata),
so a deployment can rebuild seglight's preprocessing without seglight: each step with its settings and the
MONAI call that does it, read from the very transform objects prediction runs (``describe_steps``), the channels, label values and names, the activation, the input sizes the model
was checked to take, the package versions and the checkpoint it came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monai import transforms as mt

from seglight.core.versions import package_versions
from seglight.data.normalization import value_range
from seglight.data.transforms import describe_steps, pipeline_settings
from seglight.training.checkpoints import checkpoint_epoch
from seglight.training.module import DEFAULT_INFERENCE

INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_NAME = "seglight.json"  # the JSON's name inside the model file
ONNX_TOLERANCE = 1e-4  # absolute and relative, as torch.testing.assert_close counts them


def metadata_path_of(model_path: Path) -> Path:
    """The JSON beside a model file: ``last.onnx`` -> ``last.onnx.json`` (so both formats can sit side by side)."""
    return model_path.with_name(model_path.name + ".json")


def describe(
    hparams: Mapping[str, Any],
    data: Mapping[str, Any],
    pipeline: Sequence[mt.Transform],
    ckpt: Path,
    export: Mapping[str, Any],
    shapes: Mapping[str, Any],
    checks: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The JSON beside the model: what it takes, what it returns, how to prepare the one and read the other.

    Args:
        hparams: the checkpoint module's hyperparameters (network config, threshold, label names, inference).
        data: the data settings it was trained with.
        pipeline: the deterministic transforms that prepare its input, as prediction builds them.
        ckpt: the checkpoint file.
        export: ``format``, ``model_file``, ``exported_by``, ``opset``, ``parameters``, ``trained_size``.
        shapes: what the exported model takes: ``batch`` (``any`` or a number) and ``spatial``.
        checks: the comparisons with the checkpoint (shape, passed, max_abs_difference, output_shape, error).
    """
    fmt = export["format"]
    preprocessed = pipeline_settings(data)
    net_config = dict(hparams["net"])
    in_channels = int(net_config["in_channels"])
    out_channels = next(c["output_shape"][1] for c in checks.values() if c["passed"])
    size = shapes["spatial"].get("size")
    spatial_names: list[Any] = ["x", "y", "z"] if size is None else list(size)
    batch = "batch" if shapes["batch"] == "any" else shapes["batch"]
    packages = ("seglight", "torch", "monai") + (
        ("onnx", "onnxruntime", "onnxscript") if fmt == "onnx" else ()
    )
    return {
        "format": fmt,
        "model_file": export["model_file"],
        "exported_by": export["exported_by"],
        **({"onnx_opset": export["opset"]} if fmt == "onnx" else {}),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(packages),
        "checkpoint": _checkpoint_identity(ckpt),
        "network": {**net_config, "parameters": export["parameters"]},
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [batch, in_channels, *spatial_names],
            "axes": "batch, channel, then the image's voxel axes after reorientation (see preprocessing)",
            "batch": shapes["batch"],
            "spatial": {**shapes["spatial"], "trained_size": export.get("trained_size")},
            "channels": _channels(data, in_channels),
            # [0, 1] once windowed; null once z-scored per image (unbounded)
            "value_range": value_range(preprocessed["normalize"], preprocessed["intensity"]),
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": [batch, out_channels, *spatial_names],
            "meaning": "logits, before the activation; same spatial size as the input",
        },
        "activation": _activation(out_channels, float(hparams.get("threshold", 0.5))),
        "labels": _labels(hparams.get("label_names") or {}, out_channels),
        "preprocessing": _preprocessing(pipeline, hparams.get("inference") or {}),
        "data_settings": _data_settings(data),
        "verification": {
            "device": "cpu",
            "reference": "the checkpoint's network in eval mode",
            "rule": "identical (torch.equal)"
            if fmt == "torchscript"
            else f"within {ONNX_TOLERANCE:g} (ONNX Runtime)",
            "inputs": "random values in [0, 1], seed 0",
            "checks": {name: {k: v for k, v in c.items() if v is not None} for name, c in checks.items()},
        },
        "usage": _usage(fmt, export["model_file"]),
    }


def _checkpoint_identity(path: Path) -> dict[str, Any]:
    resolved = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(resolved), "sha256": digest.hexdigest(), "epoch": checkpoint_epoch(resolved)}


def _channels(data: Mapping[str, Any], in_channels: int) -> dict[str, Any]:
    """How the image channels were stacked in training, and their names where the dataset says."""
    keys = data.get("image_key")
    described: dict[str, Any] = {"count": in_channels}
    if isinstance(keys, list) and len(keys) > 1:
        described["order"] = "one file per datalist column, in this order"
        described["names"] = [str(k) for k in keys]
        return described
    described["order"] = (
        "the image's own channels in file order (a 4D image's last axis; nnU-Net's _0000, _0001, ... files)"
    )
    names = _declared_channel_names(data.get("root"))
    if names:
        described["names"] = names
    return described


def _declared_channel_names(root: Any) -> list[str] | None:
    """nnU-Net ``channel_names`` or MSD ``modality`` of the training dataset.json, if it is still on this disk."""
    if not root or "://" in str(root):
        return None
    index = Path(str(root)).expanduser() / "dataset.json"
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    for key in ("channel_names", "modality"):
        names = meta.get(key) if isinstance(meta, Mapping) else None
        if isinstance(names, Mapping) and names:
            try:
                return [str(names[k]) for k in sorted(names, key=int)]
            except (TypeError, ValueError):
                return [str(v) for v in names.values()]
    return None


def _activation(out_channels: int, threshold: float) -> dict[str, Any]:
    if out_channels == 1:
        return {
            "type": "sigmoid",
            "threshold": threshold,
            "mask": f"sigmoid(logits) > {threshold:g} is the foreground label (1), else background (0)",
        }
    return {
        "type": "softmax",
        "dim": 1,
        "mask": "argmax over the channels: channel k is label value k",
    }


def _labels(names: Mapping[Any, str], out_channels: int) -> dict[str, str]:
    """Label value -> name, for every value the mask can take."""
    values = range(2) if out_channels == 1 else range(out_channels)
    named = {int(k): str(v) for k, v in names.items()}
    return {str(v): named.get(v, "background" if v == 0 else f"class{v}") for v in values}


def _preprocessing(pipeline: Sequence[mt.Transform], inference: Mapping[str, Any]) -> dict[str, Any]:
    """The steps that turn a scan into the model's input, in order, each with the MONAI call that does it; how
    whole volumes are run (as ``SegModule.infer`` does); and how the output goes back to the scan."""
    steps = describe_steps(pipeline)
    window = {**DEFAULT_INFERENCE, **inference}
    if window["roi_size"]:
        roi, batch = [int(s) for s in window["roi_size"]], int(window["sw_batch_size"])
        overlap, blend = float(window["overlap"]), str(window["mode"])
        run = {
            "type": "sliding window",
            "roi_size": roi,
            "sw_batch_size": batch,
            "overlap": overlap,
            "blend": blend,
            "monai": f"SlidingWindowInferer(roi_size={roi}, sw_batch_size={batch}, overlap={overlap}, mode={blend!r})",
        }
    else:
        run = {"type": "whole volume", "note": "the preprocessed volume is one input"}
    undone = [
        step["step"] for step, t in zip(steps, pipeline, strict=True) if isinstance(t, mt.InvertibleTransform)
    ]
    return {
        "steps": steps,
        "inference": run,
        "back_to_the_scan": (
            f"undo {', then '.join(reversed(undone)) or 'nothing'} (MONAI's Invertd, as seglight.predict does): "
            "probabilities are resampled linearly to the scan's grid, then activated into labels"
        ),
    }


# The data settings a deployment needs, as the checkpoint saved them (paths, caches and loaders left out).
_DATA_KEYS = (
    "mode",
    "orientation",
    "spatial_size",
    "target_spacing",
    "patch_size",
    "patch",
    "a_min",
    "a_max",
    "normalize",
    "intensity",
    "image_key",
    "label_key",
    "layout",
    "labels",
)


def _data_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    # Only the size options of the mode that was trained: the others are unused defaults that would mislead.
    unused = (
        ("target_spacing", "patch_size", "patch")
        if pipeline_settings(data)["mode"] == "resize"
        else ("spatial_size",)
    )
    settings = {key: data[key] for key in _DATA_KEYS if data.get(key) is not None and key not in unused}
    if isinstance(settings.get("patch"), Mapping):
        settings["patch"] = {k: v for k, v in settings["patch"].items() if k in ("size", "target_spacing")}
    return settings


def _usage(fmt: str, name: str) -> str:
    if fmt == "torchscript":
        return f"logits = torch.jit.load('{name}', map_location='cpu').eval()(image)"
    return (
        f"logits = onnxruntime.InferenceSession('{name}').run(['{OUTPUT_NAME}'], "
        f"{{'{INPUT_NAME}': image_as_float32_numpy}})[0]"
    )


def patch_setting(data: Mapping[str, Any], name: str) -> Any:
    """A patch-mode setting, grouped (``patch.size``) or flat as older checkpoints save it (``patch_size``)."""
    group = data.get("patch")
    if isinstance(group, Mapping) and group.get(name) is not None:
        return group[name]
    return data.get(f"patch_{name}" if name != "target_spacing" else name)
