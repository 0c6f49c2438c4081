"""Deployable models: a checkpoint's network as TorchScript or ONNX, checked against it, with a JSON beside it.

The exported model is the plain network (no activation checkpointing, channels_last or torch.compile: those are
training switches) in eval mode. It takes a preprocessed batch ``(B, C, X, Y, Z)`` of float32, exactly as the
training pipeline makes it, and returns logits ``(B, K, X, Y, Z)``. Before anything is written, the exported
model is run against the checkpoint's network on small random volumes (``seglight.exporting.checks``): TorchScript
must give identical logits, ONNX (through ONNX Runtime) logits within 1e-4. The same runs decide which input sizes the JSON promises: any
batch size, and spatial sizes that are multiples of the network's divisor, only where they were checked.
The JSON (``seglight.exporting.metadata``) is also embedded in the model file, so the two cannot part.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seglight.core.containers import plain
from seglight.core.errors import ConfigError, SeglightError, first_line
from seglight.core.io import atomic_write_bytes, atomic_write_text
from seglight.exporting.checks import (
    accepted_shapes,
    compare,
    example_input,
    onnx_runner,
    torchscript_runner,
)
from seglight.exporting.metadata import (
    INPUT_NAME,
    METADATA_NAME,
    OUTPUT_NAME,
    describe,
    metadata_path_of,
    patch_setting,
)
from seglight.models.networks import build_network, check_input_size, class_name, size_divisors
from seglight.prediction.models import load_module, preprocessing
from seglight.training.checkpoints import safe_load
from seglight.training.module import SegModule

log = logging.getLogger("seglight")

# File name endings each format may be written under; the first is the default.
SUFFIXES = {"torchscript": (".pt", ".ts", ".pth"), "onnx": (".onnx",)}
# torch's ONNX function library is written for opset 18, so the dynamo exporter needs no version conversion;
# ONNX Runtime >= 1.14 and TensorRT >= 8.6 read it.
DEFAULT_OPSET = 18
INSTALL_HINT = 'pip install "seglight[export]"'


@dataclass
class ExportResult:
    """The files an export wrote and the metadata written into them."""

    model_path: Path
    metadata_path: Path
    metadata: dict[str, Any]


def export_checkpoint(
    ckpt: str | Path,
    format: str = "torchscript",  # noqa: A002 - the command-line name
    output: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    spatial_size: Sequence[int] | None = None,
) -> ExportResult:
    """Export the network of ``ckpt`` as ``format`` into ``output`` (a folder or a file name), with its JSON.

    Args:
        ckpt: a checkpoint written by seglight training (loaded weights-only).
        format: ``torchscript`` or ``onnx``.
        output: a folder, or a file name ending as the format does (``.pt``/``.ts``/``.pth``, ``.onnx``);
            default: ``<run>/export/`` for a checkpoint in a run's ``checkpoints/`` folder, else its folder.
        opset: ONNX opset.
        dynamo: ONNX only: torch's ``torch.export``-based exporter (default); false uses the deprecated
            TorchScript-based one.
        spatial_size: the volume size checked and recorded as the trained size; default: the size the network
            was trained on (``data.spatial_size``, or the patch size in patch mode).
    """
    fmt = check_format(format)
    if fmt == "onnx":
        require_onnx(dynamo)
    model_path = output_path(ckpt, fmt, output)
    ckpt = checkpoint_file(ckpt)
    module, data = load_trained(ckpt)
    net_config = dict(module.hparams.net)
    network = plain_network(module)
    size = trained_size(module, data, spatial_size)
    check_input_size(net_config, size, "spatial_size")
    in_channels = input_channels(net_config)
    divisors = size_divisors(net_config, len(size))

    if fmt == "torchscript":
        model_bytes, how = _to_torchscript(network, example_input(in_channels, size, batch=2))
        run_exported = torchscript_runner(model_bytes)
    else:
        model_bytes, how = _to_onnx(network, in_channels, size, divisors, int(opset), bool(dynamo))
        run_exported = onnx_runner(model_bytes)
    checks = compare(network, run_exported, in_channels, size, divisors, exact=fmt == "torchscript")
    shapes = accepted_shapes(checks, size, divisors, fmt, ckpt)

    export = {
        "format": fmt,
        "model_file": model_path.name,
        "exported_by": how,
        "opset": int(opset),
        "parameters": sum(p.numel() for p in network.parameters()),
        "trained_size": _trained(module, data),
    }
    found = {name: vars(check) for name, check in checks.items()}
    # The transforms prediction runs for this checkpoint: the JSON describes them, not a restatement of them.
    pipeline = preprocessing(dict(module.hparams.data))
    metadata = describe(dict(module.hparams), data, pipeline, ckpt, export, shapes, found)
    text = json.dumps(metadata, indent=2)
    model_bytes = _with_metadata(fmt, model_bytes, text)
    metadata_path = metadata_path_of(model_path)
    # The JSON first: a model file on disk always has its JSON beside it (and its own copy inside).
    atomic_write_text(metadata_path, text + "\n")
    atomic_write_bytes(model_path, model_bytes)
    log.info(
        "%s exported with %s; checked against the checkpoint at %s",
        class_name(net_config),
        how,
        ", ".join(
            "x".join(map(str, c.shape)) + ("" if c.passed else " (not accepted)") for c in checks.values()
        ),
    )
    return ExportResult(model_path=model_path, metadata_path=metadata_path, metadata=metadata)


# -- options ---------------------------------------------------------------------------------------------------


def check_format(format: str) -> str:  # noqa: A002 - the command-line name
    """The format, lower-cased; ConfigError naming the choices for any other."""
    fmt = str(format).strip().lower()
    if fmt not in SUFFIXES:
        raise ConfigError(
            f"format={format}: unknown export format; use format=torchscript, format=onnx or format=bundle"
        )
    return fmt


def require_onnx(dynamo: bool = True) -> None:
    """ConfigError naming the extra to install when the ONNX tools are missing."""
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if dynamo else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"format=onnx needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {INSTALL_HINT}"
        )


def checkpoint_file(ckpt: str | Path) -> Path:
    """``ckpt`` as a path; a folder is a ConfigError that lists the checkpoints it holds."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in (*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")))
        listed = f": one of {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else ""
        raise ConfigError(f"ckpt={ckpt}: a folder; give a checkpoint file{listed}")
    return path


def output_path(ckpt: str | Path, fmt: str, output: str | Path | None) -> Path:
    """The model file to write: ``output`` when it is a file name of this format, else a file in that folder.

    The file is named after the checkpoint (``best-epoch012-dice0.8123.onnx``). A file name ending as the other
    format does is a ConfigError, as is a folder that is an existing file.
    """
    name = Path(ckpt).name
    stem = name[: -len(".ckpt")] if name.endswith(".ckpt") else name
    if output is None or str(output) == "":
        parent = Path(ckpt).expanduser().resolve().parent
        folder = parent.parent / "export" if parent.name == "checkpoints" else parent
        return folder / (stem + SUFFIXES[fmt][0])
    target = Path(output).expanduser()
    if target.suffix.lower() in SUFFIXES[fmt]:
        return target.resolve()
    other = [f for f, endings in SUFFIXES.items() if f != fmt and target.suffix.lower() in endings]
    if other:
        raise ConfigError(
            f"output={output}: a {other[0]} file name, but format={fmt}; name it {target.stem}{SUFFIXES[fmt][0]} "
            "or give a folder"
        )
    if target.is_file():
        raise ConfigError(
            f"output={output}: an existing file, not a folder; give a folder or a *{SUFFIXES[fmt][0]} name"
        )
    return target.resolve() / (stem + SUFFIXES[fmt][0])


# -- what the checkpoint holds ---------------------------------------------------------------------------------


def load_trained(ckpt: Path) -> tuple[SegModule, dict[str, Any]]:
    """The checkpoint's module (read weights-only, on the CPU) and the data settings it was trained with."""
    module = load_module(ckpt)
    # The data module's own record is the fuller one (layout, label key, patch settings); the module's holds what
    # prediction needs, for checkpoints written without a data module.
    saved = plain(safe_load(ckpt, mmap=True).get("datamodule_hyper_parameters") or {})
    return module, {**dict(module.hparams.data), **saved}


def plain_network(module: SegModule) -> nn.Module:
    """The checkpoint's network without seglight's training switches, with its weights, in eval mode, on the CPU.

    Activation checkpointing replaces block ``forward``s with closures, channels_last changes the weights'
    memory layout and torch.compile wraps the call: none of that belongs in a deployed model, and the
    weights (the state dict) are the same with or without them.
    """
    arguments = dict(module.hparams.net)
    network = build_network(arguments)
    network.load_state_dict(module.net.state_dict())
    return network.cpu().eval()


def trained_size(
    module: SegModule, data: Mapping[str, Any], spatial_size: Sequence[int] | None = None
) -> list[int]:
    """The volume size the network was trained on: the patch (sliding window) size, else ``spatial_size``."""
    if spatial_size is not None:
        size = [int(s) for s in spatial_size]
        if len(size) != 3 or min(size) < 1:
            raise ConfigError(
                f"spatial_size must be three positive sizes (x, y, z), got {list(spatial_size)}"
            )
        return size
    window = (module.hparams.get("inference") or {}).get("roi_size")
    size = window or (
        patch_setting(data, "size") if data.get("mode") == "patch" else data.get("spatial_size")
    )
    if not size:
        raise ConfigError(
            "the checkpoint has no saved input size (no data settings): give spatial_size=[x,y,z]"
        )
    return [int(s) for s in size]


def input_channels(net_config: Mapping[str, Any]) -> int:
    """The image channels the network takes (its ``in_channels``)."""
    value = net_config.get("in_channels")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"model: {class_name(net_config)} has no in_channels in the checkpoint's network config, so the "
            "input of the exported model is unknown"
        )
    return value


# -- exporting ---------------------------------------------------------------------------------------------------


def _traceable_size(size: Sequence[int], divisors: Sequence[int] | None) -> list[int]:
    """``size``, raised where the network's deepest feature map would be one voxel.

    torch.export specialises every dimension whose example value is 1, and would then fix the input size.
    """
    if divisors is None:
        return list(size)
    return [2 * d if s // d < 2 and s % d == 0 else s for s, d in zip(size, divisors, strict=True)]


def _to_torchscript(network: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """The network scripted (``torch.jit.script``, which keeps every shape rule), else traced on ``example``."""
    with torch.no_grad():
        try:
            module = torch.jit.script(network)
            how = "torch.jit.script"
        except Exception as scripting:  # scripting refuses much Python (SwinUNETR's): tracing may still work
            log.info("TorchScript: scripting failed (%s); tracing instead", first_line(scripting))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    module = torch.jit.trace(network, example)
            except Exception as tracing:
                raise SeglightError(
                    f"format=torchscript: torch cannot script or trace {type(network).__name__} "
                    f"({first_line(tracing)}); try format=onnx"
                ) from None
            how = "torch.jit.trace"
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue(), how


def _to_onnx(
    network: nn.Module, channels: int, size: list[int], divisors: list[int] | None, opset: int, dynamo: bool
) -> tuple[bytes, str]:
    """ONNX bytes of the network, with a dynamic batch and dynamic spatial sizes where the exporter allows."""
    if dynamo:
        return _to_onnx_dynamo(network, channels, size, divisors, opset)
    example = example_input(channels, size, batch=2)
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    buffer = io.BytesIO()
    with _quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                network,
                (example,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                opset_version=opset,
            )
        except Exception as exc:
            raise SeglightError(
                f"format=onnx dynamo=false: torch cannot export {type(network).__name__} ({first_line(exc)})"
            ) from None
    return buffer.getvalue(), f"torch.onnx.export(dynamo=False), opset {opset}"


def _to_onnx_dynamo(
    network: nn.Module, channels: int, size: list[int], divisors: list[int] | None, opset: int
) -> tuple[bytes, str]:
    """``torch.onnx.export(dynamo=True)``: batch and spatial sizes dynamic, else batch only, else fixed."""
    from torch.export import Dim

    batch = Dim("batch", min=1)
    if divisors is None:
        spatial = {axis: Dim.AUTO for axis in (2, 3, 4)}
    else:
        # Sizes written as multiples (8*x): the ONNX graph itself says which sizes the network takes.
        spatial = {
            axis: d * Dim(name, min=1) if d > 1 else Dim(name, min=1)
            for axis, name, d in zip((2, 3, 4), "xyz", divisors, strict=True)
        }
    attempts = [
        ("batch and spatial sizes dynamic", _traceable_size(size, divisors), {0: batch, **spatial}, 2),
        ("batch dynamic", size, {0: batch}, 2),
        ("fixed shape", size, None, 1),
    ]
    failures = []
    for what, example_size, dims, batch_size in attempts:
        example = example_input(channels, example_size, batch=batch_size)
        try:
            with _quiet_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    network,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=(dims,) if dims else None,
                    opset_version=opset,
                    verbose=False,
                )
            proto = program.model_proto
        except Exception as exc:  # torch.export's refusals come as many types: try the next attempt
            failures.append(f"{what}: {_export_failure(exc)}")
            log.info("ONNX export with %s failed (%s)", what, _export_failure(exc))
            continue
        return proto.SerializeToString(), f"torch.onnx.export(dynamo=True), opset {opset}, {what}"
    raise SeglightError(
        f"format=onnx: torch cannot export {type(network).__name__} ({failures[-1]}); try format=torchscript "
        "or dynamo=false"
    )


_EXPORTER_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch._guards",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' chatter (optional-operator notices, deprecation and tracer warnings)."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            # torch.export logs the guards it could not prove (the reason a dynamic size fails) as errors;
            # the fallback handles that and says so in one line.
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _with_metadata(fmt: str, model_bytes: bytes, text: str) -> bytes:
    """The model file with the JSON inside: a TorchScript extra file, or ONNX ``metadata_props``."""
    if fmt == "torchscript":
        module = torch.jit.load(io.BytesIO(model_bytes), map_location="cpu")
        buffer = io.BytesIO()
        torch.jit.save(module, buffer, _extra_files={METADATA_NAME: text})
        return buffer.getvalue()
    import onnx

    model = onnx.load_model_from_string(model_bytes)
    onnx.helper.set_model_props(model, {METADATA_NAME: text})
    model.doc_string = "seglight segmentation network: preprocessed image (B, C, X, Y, Z) -> logits"
    return model.SerializeToString()


def _trained(module: SegModule, data: Mapping[str, Any]) -> list[int] | None:
    try:
        return trained_size(module, data)
    except ConfigError:
        return None


def _export_failure(error: BaseException) -> str:
    """The cause torch's ONNX exporter reports under its ``## Exception summary``, else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the exporter colours its message for terminals
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines[:-1]:
        return lines[lines.index("## Exception summary") + 1]
    return lines[0] if lines else type(error).__name__
