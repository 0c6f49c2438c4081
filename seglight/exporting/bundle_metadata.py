"""What a MONAI bundle says about itself: ``configs/metadata.json`` in MONAI's schema, and ``docs/README.md``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seglight.core.versions import package_versions
from seglight.data.datalists import IMAGE
from seglight.data.normalization import describe_normalization, value_range
from seglight.exporting.formats import input_channels
from seglight.models.networks import class_name
from seglight.prediction.predictor import PRED

SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
BUNDLE_VERSION = "0.1.0"

MONAI_REFERENCE = "Cardoso MJ et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701, 2022."
# The paper behind each MONAI network seglight trains, by class name.
NETWORK_REFERENCES = {
    "SegResNet": "Myronenko A. 3D MRI brain tumor segmentation using autoencoder regularization. "
    "BrainLes 2018, LNCS 11384.",
    "UNet": "Kerfoot E et al. Left-ventricle quantification using residual U-Net. STACOM 2018, LNCS 11395.",
    "DynUNet": "Isensee F et al. nnU-Net: a self-configuring method for deep learning-based biomedical image "
    "segmentation. Nature Methods 18, 203-211, 2021.",
    "UNETR": "Hatamizadeh A et al. UNETR: Transformers for 3D medical image segmentation. WACV 2022.",
    "SwinUNETR": "Hatamizadeh A et al. Swin UNETR: Swin transformers for semantic segmentation of brain tumors "
    "in MRI images. BrainLes 2021, LNCS 12962.",
}


def bundle_metadata(
    ckpt: Path,
    net_config: Mapping[str, Any],
    labels: Mapping[int, str],
    size: list[int],
    settings: Mapping[str, Any],
    window: Mapping[str, Any],
) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's schema: versions, task, the network's input and output, labels."""
    versions = package_versions(("seglight", "monai", "torch", "numpy", "nibabel"))
    in_channels = input_channels(net_config)
    patch = settings.get("mode") == "patch"
    named = ", ".join(f"{v} {n}" for v, n in labels.items())
    a_min, a_max = settings.get("a_min", -1000.0), settings.get("a_max", 1000.0)
    normalize, intensity = settings.get("normalize", "window"), settings.get("intensity")
    intensities = describe_normalization(normalize, a_min, a_max)
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by seglight {versions.get('seglight')} from {ckpt.name}"},
        "monai_version": str(versions.get("monai")),
        "pytorch_version": str(versions.get("torch")),
        "numpy_version": str(versions.get("numpy")),
        "required_packages_version": {"nibabel": str(versions.get("nibabel"))},
        "name": f"seglight {class_name(net_config)} ({ckpt.name})",
        "task": f"3D segmentation ({named})",
        "description": (
            f"A {class_name(net_config)} trained with seglight, as seglight.predict runs it: each scan reoriented "
            f"to {settings.get('orientation', 'RAS')}, "
            + (
                f"resized to {settings.get('spatial_size')}"
                if not patch
                else f"resampled to {settings['target_spacing']} mm"
                if settings.get("target_spacing")
                else "kept at its own spacing"
            )
            + f", {intensities}, segmented, and the probabilities taken back "
            "to the scan's grid before they become labels."
        ),
        "authors": "the authors of the seglight training run",
        "copyright": "the authors of the seglight training run",
        "data_type": "nibabel",
        "image_classes": f"{in_channels} channel(s), {intensities}",
        "pred_classes": named,
        "intended_use": "research; not validated for clinical use",
        "references": network_references(class_name(net_config)),
        "network_data_format": {
            "inputs": {
                IMAGE: {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": in_channels,
                    "spatial_shape": [int(s) for s in size],
                    "dtype": "float32",
                    "value_range": value_range(normalize, intensity) or [],  # []: unbounded (z-scored)
                    "is_patch_data": bool(window.get("roi_size")),
                    "channel_def": {str(c): f"channel {c}" for c in range(in_channels)},
                }
            },
            "outputs": {
                PRED: {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": int(net_config.get("out_channels", 1)),
                    "spatial_shape": [int(s) for s in size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": bool(window.get("roi_size")),
                    "channel_def": _channel_names(labels, int(net_config.get("out_channels", 1))),
                }
            },
            "post_processed_outputs": {
                PRED: {
                    "type": "image",
                    "format": "labels",
                    "num_channels": 1,
                    "spatial_shape": ["*", "*", "*"],
                    "dtype": "uint8",
                    "value_range": [min(labels), max(labels)],
                    "channel_def": {str(v): n for v, n in labels.items()},
                }
            },
        },
        "seglight": {"checkpoint": ckpt.name, "data": _json(settings), "inference": _json(window)},
    }


def bundle_labels(names: Mapping[Any, str], out_channels: int) -> dict[int, str]:
    """Label value -> name for every value the masks can take (unnamed: background, class<k>)."""
    named = {int(k): str(v) for k, v in names.items()}
    values = range(2) if out_channels == 1 else range(out_channels)
    return {v: named.get(v, "background" if v == 0 else f"class{v}") for v in values}


def _channel_names(labels: Mapping[int, str], out_channels: int) -> dict[str, str]:
    if out_channels == 1:
        return {"0": f"{labels[1]} (sigmoid; above the threshold: label 1)"}
    return {str(v): n for v, n in labels.items()}


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def network_references(network: str) -> list[str]:
    """Published references for the bundle: the network's paper where seglight knows it, and MONAI's."""
    return [r for r in (NETWORK_REFERENCES.get(network), MONAI_REFERENCE) if r]


def readme(
    metadata: Mapping[str, Any], labels: Mapping[int, str], size: list[int], window: Mapping[str, Any]
) -> str:
    """``docs/README.md``: what the bundle segments, how to run and check it, what its inference does."""
    listed = "\n".join(f"| {value} | {name} |" for value, name in labels.items())
    windows = (
        f"sliding windows of {list(window['roi_size'])} (overlap {window['overlap']}, {window['mode']} blending)"
        if window.get("roi_size")
        else "one pass over the whole preprocessed volume"
    )
    return f"""# {metadata["name"]}

{metadata["description"]}

Exported by seglight ({metadata["changelog"][metadata["version"]]}); MONAI {metadata["monai_version"]},
PyTorch {metadata["pytorch_version"]}. Intended use: {metadata["intended_use"]}.

## Labels

| value | name |
| --- | --- |
{listed}

## Run it

Only MONAI (with nibabel) is needed. From this folder:

```
python -m monai.bundle run --config_file configs/inference.json --dataset_dir <folder of .nii.gz> --output_dir <masks>
```

Every `.nii.gz` and `.nii` file of the folder becomes `<output_dir>/<name>.nii.gz`, a mask of label values with
the scan's own shape and affine: the masks `python -m seglight.predict` writes for the same scans. A case given
as one file per channel is not read; give each case as one (4D) file.

Check the bundle:

```
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath <meta_schema_20240725.json>
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
```

## What inference does

`preprocessing` in `configs/inference.json` is seglight's own pipeline: load, channel first, reorient, resize or
resample, window the intensities to 0..1. The network (`network_def`, weights in `models/model.pt`) runs
{windows}, trained size {size}. The probabilities (sigmoid, or softmax over the channels) are taken back to the
scan's grid through every spatial step (`Invertd`, linear interpolation) and only then become labels (above the
threshold, or the argmax), as seglight does.
"""
