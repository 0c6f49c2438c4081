"""FSDP for MONAI networks: one shard unit per network block (never per layer), and optional activation
checkpointing of those blocks through the strategy (``trainer=fsdp``, see ``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from seglight.core.errors import ConfigError

# The repeated blocks of the networks in conf/model: what FSDP shards as one unit. Nested blocks (a UNETR
# decoder block holds a residual block) become nested units, which FSDP supports.
WRAP_BLOCKS = (
    "monai.networks.blocks.segresnet_block.ResBlock",  # SegResNet
    "monai.networks.blocks.convolutions.ResidualUnit",  # UNet
    "monai.networks.blocks.dynunet_block.UnetResBlock",  # DynUNet, and the decoders of UNETR and SwinUNETR
    "monai.networks.blocks.dynunet_block.UnetBasicBlock",
    "monai.networks.blocks.dynunet_block.UnetUpBlock",
    "monai.networks.blocks.unetr_block.UnetrBasicBlock",
    "monai.networks.blocks.unetr_block.UnetrUpBlock",
    "monai.networks.blocks.unetr_block.UnetrPrUpBlock",
    "monai.networks.nets.swin_unetr.SwinTransformerBlock",  # SwinUNETR's encoder
    "monai.networks.blocks.transformerblock.TransformerBlock",  # UNETR's encoder (ViT)
)
# Blocks whose activations are recomputed in the backward pass: none holds another, so nothing runs twice over.
CHECKPOINT_BLOCKS = (
    "monai.networks.blocks.segresnet_block.ResBlock",
    "monai.networks.blocks.convolutions.ResidualUnit",
    "monai.networks.blocks.dynunet_block.UnetResBlock",
    "monai.networks.blocks.dynunet_block.UnetBasicBlock",
    "monai.networks.nets.swin_unetr.SwinTransformerBlock",
    "monai.networks.blocks.transformerblock.TransformerBlock",
)


def block_classes(names: Iterable[str]) -> set[type[nn.Module]]:
    """The module classes named ``package.module.Class``; a name that is not one is a ConfigError."""
    classes: set[type[nn.Module]] = set()
    for name in names:
        module_name, _, class_name = str(name).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"trainer.strategy: no module class {name} ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ConfigError(f"trainer.strategy: {name} is not a torch.nn.Module class")
        classes.add(cls)
    return classes


def fsdp_strategy(
    activation_checkpointing: bool = False,
    wrap_blocks: Iterable[str] = WRAP_BLOCKS,
    checkpoint_blocks: Iterable[str] = CHECKPOINT_BLOCKS,
    state_dict_type: str = "full",
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy with MONAI's blocks as shard units and, if asked, as activation checkpoints.

    ``state_dict_type="full"`` saves one ``.ckpt`` file (gathered on rank 0) that resumes on any number of GPUs
    and loads for prediction; ``"sharded"`` saves a folder of per-rank shards (faster for very large networks),
    which ``python -m lightning.pytorch.utilities.consolidate_checkpoint <folder>`` turns into one file.
    """
    if state_dict_type not in ("full", "sharded"):
        raise ConfigError(
            f"trainer.strategy.state_dict_type must be full or sharded, got {state_dict_type!r}"
        )
    return FSDPStrategy(
        auto_wrap_policy=block_classes(wrap_blocks),
        activation_checkpointing_policy=block_classes(checkpoint_blocks)
        if activation_checkpointing
        else None,
        state_dict_type=state_dict_type,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        **kwargs,
    )
