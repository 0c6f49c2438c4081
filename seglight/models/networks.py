"""Networks from configs: the default, building one (``build_network``), channel and class counts from the data,
input-size checks, nnU-Net-style DynUNet geometry, and the memory and speed switches (activation checkpointing,
channels_last_3d, torch.compile)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.checkpoint import checkpoint

from seglight.core.errors import ConfigError

log = logging.getLogger("seglight")

AUTO = "auto"
DEFAULT_NET = {
    "_target_": "monai.networks.nets.SegResNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "init_filters": 16,
    "dropout_prob": 0.2,
}
# seglight's memory and speed switches (the config's compute block), none of them a network argument.
DEFAULT_COMPUTE = {"checkpointing": False, "channels_last": False, "compile": False}
LAYER_SPEC_KEYS = ("norm", "norm_name", "act", "act_name", "dropout")
# The layers whose training statistics come from the batch (torch's subclasses of its private _BatchNorm).
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
_AUTO_MESSAGE = (
    "model.{key}=auto is filled in from the data: build the module with seglight.build(cfg) (or "
    "seglight.config.builder.build_module(cfg, datamodule)), or give a number"
)


def class_name(config: Mapping[str, Any]) -> str:
    """The network's class name (last part of ``_target_``)."""
    return str(config.get("_target_", "")).rsplit(".", 1)[-1]


def build_network(config: Mapping[str, Any], compute: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate a network config with the ``compute`` switches, turning a wrong ``_target_`` or argument into
    a ConfigError."""
    target = config.get("_target_", "<no _target_>") if isinstance(config, Mapping) else config
    arguments = dict(config)
    options = dict(compute or {})
    unresolved = [key for key, value in arguments.items() if isinstance(value, str) and value == AUTO]
    if unresolved:
        raise ConfigError(_AUTO_MESSAGE.format(key=unresolved[0]))
    hydra_args, direct_args = network_arguments(arguments, options)
    try:
        net = instantiate(hydra_args, _partial_=True)(**direct_args)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"model: cannot build {target}: {cause}") from exc
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model: {target} is not a torch.nn.Module")
    return apply_options(net, arguments, options)


def out_channels(config: Mapping[str, Any]) -> int:
    """The network's output channels (1 when the config does not say); a ConfigError while still ``auto``."""
    channels = config.get("out_channels", 1)
    if channels == AUTO:
        raise ConfigError(_AUTO_MESSAGE.format(key="out_channels"))
    return int(channels)


def foreground_labels(label_names: Mapping[int, str]) -> list[int]:
    """The label values other than background (0), checked to be 1..K as MONAI's one-hot encoding needs."""
    values = sorted(int(v) for v in label_names if int(v) != 0)
    if values and values != list(range(1, len(values) + 1)):
        raise ConfigError(
            f"the dataset's labels ({describe_labels(label_names)}) are not consecutive: seglight needs the "
            "label values 0 (background), 1, ..., K in the label maps and in dataset.json"
        )
    return values


def output_channels(label_names: Mapping[int, str]) -> int:
    """1 (sigmoid) for one foreground label, else one channel per label including background (softmax)."""
    foreground = foreground_labels(label_names)
    return 1 if len(foreground) <= 1 else len(foreground) + 1


def describe_labels(label_names: Mapping[int, str]) -> str:
    """``0 background, 1 organ, 2 cyst``."""
    return ", ".join(f"{v} {label_names[v]}" for v in sorted(label_names))


def resolve_network_config(
    config: Mapping[str, Any],
    in_channels: int,
    label_names: Mapping[int, str],
    input_size: Sequence[int],
    size_option: str,
    spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Fill the ``auto`` values of a model config from the data and check the network suits it.

    Args:
        config: the model config (``_target_`` and arguments, ``auto`` allowed for channel counts and for
            DynUNet's ``kernel_size``/``strides``/``upsample_kernel_size`` and UNETR's ``img_size``).
        in_channels: channels of the images.
        label_names: label value -> name, background (0) included; empty when the dataset does not say.
        input_size: the spatial size the network sees (resize: ``data.spatial_size``; patch: ``data.patch.size``).
        size_option: the option that sets ``input_size``, for messages.
        spacing: voxel spacing (mm) at that size, for DynUNet's kernels and strides.
    """
    cfg = dict(config)
    name = class_name(cfg)
    size = [int(s) for s in input_size]
    _fill_channels(cfg, in_channels, label_names)
    if name == "DynUNet":
        _fill_dynunet(cfg, size, spacing, size_option)
    if name == "UNETR":
        if cfg.get("img_size", AUTO) == AUTO:
            cfg["img_size"] = size
        elif [int(s) for s in _as_list(cfg["img_size"], len(size))] != size:
            raise ConfigError(
                f"model.img_size={_as_list(cfg['img_size'], len(size))} differs from {size_option}={size}: "
                "UNETR's position embeddings fix its input size; set model.img_size=auto"
            )
    check_input_size(cfg, size, size_option)
    return cfg


def _fill_channels(cfg: dict[str, Any], in_channels: int, label_names: Mapping[int, str]) -> None:
    if "in_channels" in cfg:
        if cfg["in_channels"] == AUTO:
            cfg["in_channels"] = int(in_channels)
        elif int(cfg["in_channels"]) != int(in_channels):
            raise ConfigError(
                f"model.in_channels={cfg['in_channels']} but the images have {in_channels} channel(s): "
                "set model.in_channels=auto (or to the number of image channels)"
            )
    if "out_channels" not in cfg:
        return
    if cfg["out_channels"] == AUTO:
        cfg["out_channels"] = output_channels(label_names) if label_names else 1
        return
    out = int(cfg["out_channels"])
    if not label_names:
        return  # the dataset does not name its labels: trust the user
    classes = len(foreground_labels(label_names)) + 1
    allowed = {1, classes} if classes == 2 else {classes}
    if out not in allowed:
        more = "more classes in the labels than" if out < classes else "fewer classes in the labels than"
        raise ConfigError(
            f"model.out_channels={out}, but there are {more} the network's output channels: "
            f"dataset.json has {classes} classes ({describe_labels(label_names)}); "
            f"set model.out_channels={output_channels(label_names)} or model.out_channels=auto"
        )


# -- DynUNet: nnU-Net's rules for kernels and strides --------------------------------------------------------


def dynunet_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float], min_size: int = 8, max_stages: int = 6
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernel sizes and strides per stage from the patch size and spacing, as nnU-Net plans them.

    An axis is halved while it is at least ``min_size`` voxels and its spacing is within twice the finest
    spacing; coarse axes get 1-voxel kernels until the others have caught up (anisotropic CT/MRI).
    """
    sizes = [float(s) for s in patch_size]
    spacings = [float(s) for s in spacing]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * len(sizes)]
    while len(strides) < max_stages:
        ratios = [s / min(spacings) for s in spacings]
        stride = [
            2 if r <= 2 and n >= min_size and n % 2 == 0 else 1 for r, n in zip(ratios, sizes, strict=True)
        ]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratios])
        strides.append(stride)
        sizes = [n / s for n, s in zip(sizes, stride, strict=True)]
        spacings = [p * s for p, s in zip(spacings, stride, strict=True)]
    kernels.append([3 if s / min(spacings) <= 2 else 1 for s in spacings])
    return kernels, strides


def _fill_dynunet(cfg: dict[str, Any], size: list[int], spacing: Sequence[float] | None, option: str) -> None:
    derived = AUTO in (cfg.get("kernel_size"), cfg.get("strides"), cfg.get("upsample_kernel_size"))
    if derived:
        kernels, strides = dynunet_kernels_strides(size, spacing or [1.0] * len(size))
        if len(strides) < 2:
            raise ConfigError(f"{option}={size} is too small for DynUNet: every size should be at least 8")
        if cfg.get("kernel_size") == AUTO:
            cfg["kernel_size"] = kernels
        if cfg.get("strides") == AUTO:
            cfg["strides"] = strides
        if cfg.get("upsample_kernel_size") == AUTO:
            cfg["upsample_kernel_size"] = cfg["strides"][1:]
        log.info("DynUNet for %s at spacing %s: kernels %s, strides %s", size, spacing, kernels, strides)
    stages = len(cfg["strides"])
    filters = cfg.get("filters")
    if filters is not None and len(filters) != stages:
        raise ConfigError(
            f"model.filters has {len(filters)} entries but DynUNet has {stages} stages for {option}={size}: "
            f"give {stages} filter counts or model.filters=null"
        )
    if cfg.get("deep_supervision"):
        raise ConfigError("model.deep_supervision=true is not supported: seglight trains on the final output")


# -- input size constraints -----------------------------------------------------------------------------------


def size_divisors(config: Mapping[str, Any], dims: int = 3) -> list[int] | None:
    """Per-axis number the input sizes must be a multiple of, for the MONAI networks that need one."""
    name = class_name(config)
    if name in ("SegResNet", "SegResNetDS", "SegResNetVAE"):
        blocks_down = config.get("blocks_down") or (1, 2, 2, 4)
        return [2 ** (len(blocks_down) - 1)] * dims
    if name in ("UNet", "Unet", "CheckpointUNet", "AttentionUnet", "DynUNet"):
        strides = config.get("strides")
        if not isinstance(strides, Sequence) or isinstance(strides, str):
            return None
        divisors = [1] * dims
        for stride in strides:
            for axis, s in enumerate(_as_list(stride, dims)):
                divisors[axis] *= int(s)
        return divisors
    if name == "SwinUNETR":
        return [int(config.get("patch_size", 2)) ** 5] * dims
    if name == "UNETR":
        return [16] * dims  # the ViT's fixed 16-voxel patches
    return None


def check_input_size(config: Mapping[str, Any], size: Sequence[int], option: str) -> None:
    """ConfigError, with a size that works, when the network cannot take inputs of ``size``."""
    divisors = size_divisors(config, len(size))
    if divisors is None:
        return
    if all(int(s) % d == 0 for s, d in zip(size, divisors, strict=True)):
        deepest = [int(s) // d for s, d in zip(size, divisors, strict=True)]
        if class_name(config) == "SwinUNETR" and math.prod(deepest) < 2:
            # Its bottleneck is instance-normalised, which needs more than one voxel to train.
            raise ConfigError(
                f"{option}={list(size)} is too small for SwinUNETR: its deepest feature map ({option} / "
                f"{divisors[0]}) must have more than one voxel; use e.g. {option}="
                f"{[*list(size)[:-1], 2 * divisors[-1]]}"
            )
        return
    suggestion = [max(d, math.floor(int(s) / d + 0.5) * d) for s, d in zip(size, divisors, strict=True)]
    rule = (
        f"a multiple of {divisors[0]}" if len(set(divisors)) == 1 else f"a multiple of {divisors} (per axis)"
    )
    raise ConfigError(
        f"{option}={list(size)} does not suit {class_name(config)}: every size must be {rule}; "
        f"use e.g. {option}={suggestion}"
    )


def _as_list(value: Any, dims: int) -> list[Any]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value] * dims


# -- memory and speed switches --------------------------------------------------------------------------------


def network_arguments(
    config: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config for Hydra, arguments passed as they are): layer specifiers become ``(name, {args})`` tuples,
    which YAML can only write as lists and Hydra would turn back into lists; ``checkpointing`` is passed on to
    networks that implement it."""
    net = dict(config)
    direct: dict[str, Any] = {}
    for key in LAYER_SPEC_KEYS:
        value = net.get(key)
        if isinstance(value, list) and len(value) == 2 and isinstance(value[1], Mapping):
            direct[key] = (value[0], dict(value[1]))
            del net[key]
    if options.get("checkpointing") and class_name(net) == "SwinUNETR":
        net["use_checkpoint"] = True
    return net, direct


def apply_options(net: nn.Module, config: Mapping[str, Any], options: Mapping[str, Any]) -> nn.Module:
    """Activation checkpointing, channels_last_3d and torch.compile, each switched on in ``options`` (compute).

    Everything is done in place, so the state dict (and checkpoints) look the same with or without them.
    """
    if options.get("checkpointing") and class_name(config) != "SwinUNETR":
        wrapped = enable_activation_checkpointing(net)
        if wrapped == 0:
            raise ConfigError(
                f"compute.checkpointing=true: {class_name(config)} has no MONAI blocks to checkpoint; "
                "set compute.checkpointing=false"
            )
    if options.get("channels_last"):
        net.to(memory_format=torch.channels_last_3d)
    if options.get("compile"):
        net.compile()
    return net


def enable_activation_checkpointing(net: nn.Module) -> int:
    """Recompute each MONAI block's activations in the backward pass instead of keeping them; returns the count.

    The outermost modules from ``monai.networks.blocks`` (residual blocks, conv units, transformer blocks) are
    checkpointed: fine enough that only one block's activations are alive at a time in the backward pass,
    coarse enough that recomputation stays about one extra forward pass. Their ``forward`` is replaced on the
    instance, so parameter names do not change. Caveat: BatchNorm statistics are updated again on recomputation.
    """
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for child in module.children():
            is_block = type(child).__module__.startswith("monai.networks.blocks")
            if is_block and any(p.requires_grad for p in child.parameters()):
                _checkpoint_forward(child)
                count += 1
            else:
                visit(child)

    visit(net)
    return count


def _checkpoint_forward(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed


def normalises_over_batch(net: nn.Module) -> bool:
    """Whether ``net`` has batch normalisation, whose training statistics need more than one value per channel."""
    return any(isinstance(m, BATCH_NORMS) for m in net.modules())
