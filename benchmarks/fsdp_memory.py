"""Peak GPU memory and step time of SegResNet and SwinUNETR at the lab's size: DDP vs FSDP vs activation
checkpointing, at 32-bit and 16-mixed. GPUs only (FSDP does not run on the CPU): without CUDA it prints one line
and exits 0.

One training step is forward, backward and an Adam step on a random volume of the lab's size (128x128x64,
batch 2), so the figures include weights, gradients, optimiser state and activations. FSDP shards one unit per
MONAI block, as ``trainer=fsdp`` does (``seglight.training.fsdp``); activation checkpointing recomputes the same blocks.

    python benchmarks/fsdp_memory.py                            # one GPU: what a single process needs
    torchrun --nproc_per_node 4 benchmarks/fsdp_memory.py       # 4 GPUs: FSDP's shards are a quarter each
    python benchmarks/fsdp_memory.py --model swinunetr --batch 1 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from seglight.models.networks import DEFAULT_NET

NETS = {
    # The lab's reference SegResNet (4.7 M parameters) and SwinUNETR as conf/model configures them.
    "segresnet": DEFAULT_NET,
    "swinunetr": {
        "_target_": "monai.networks.nets.SwinUNETR",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "feature_size": 48,
    },
}
SETUPS = ("ddp", "ddp+checkpointing", "fsdp", "fsdp+checkpointing")


def build(name: str) -> nn.Module:
    from hydra.utils import instantiate

    return instantiate(NETS[name])


def with_checkpointing(net: nn.Module) -> nn.Module:
    """Recompute the activations of seglight's checkpoint blocks in the backward pass (as the FSDP strategy)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from seglight.training.fsdp import CHECKPOINT_BLOCKS, block_classes

    blocks = tuple(block_classes(CHECKPOINT_BLOCKS))
    apply_activation_checkpointing(
        net,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda module: isinstance(module, blocks),
    )
    return net


def wrap(net: nn.Module, setup: str, device: torch.device) -> nn.Module:
    """The network as ``setup`` trains it: DDP (replicated) or FSDP (one shard unit per MONAI block)."""
    if setup.endswith("+checkpointing"):
        net = with_checkpointing(net)
    net = net.to(device)
    if setup.startswith("fsdp"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from seglight.training.fsdp import WRAP_BLOCKS, block_classes

        return FullyShardedDataParallel(
            net, auto_wrap_policy=ModuleWrapPolicy(block_classes(WRAP_BLOCKS)), device_id=device
        )
    return nn.parallel.DistributedDataParallel(net, device_ids=[device.index])


def measure(
    name: str, setup: str, precision: str, size: list[int], batch: int, steps: int
) -> tuple[float, float]:
    """(peak GPU memory in GB, median seconds per step) of one setup on this process's GPU."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    model = wrap(build(name), setup, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    half = precision == "16-mixed"
    if setup.startswith("fsdp"):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(enabled=half)
    else:
        scaler = torch.amp.GradScaler("cuda", enabled=half)
    image = torch.rand(batch, 1, *size, device=device)
    target = (torch.rand(batch, 1, *size, device=device) > 0.5).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            loss = loss_fn(model(image).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step()  # warm-up: cuDNN's algorithm search and the optimiser state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9
    return peak, statistics.median(times)


@contextlib.contextmanager
def process_group() -> Iterator[int]:
    """torch.distributed over NCCL: torchrun's processes, or this one process alone."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(NETS), nargs="+", default=sorted(NETS))
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 64], help="the lab's input size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--setup", choices=SETUPS, nargs="+", default=list(SETUPS))
    parser.add_argument("--precision", choices=("32", "16-mixed"), nargs="+", default=["32", "16-mixed"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("fsdp_memory: skipped, no CUDA GPU (FSDP and its memory figures need GPUs)")
        return
    warnings.filterwarnings("ignore")
    with process_group() as rank:
        world = dist.get_world_size()
        if rank == 0:
            print(f"{torch.cuda.get_device_name()} x {world}; input {args.size}, batch {args.batch} per GPU")
            print(f"{'model':<10} {'setup':<19} {'precision':<9} {'peak GB':>8} {'s/step':>7}")
        for name in args.model:
            for setup in args.setup:
                for precision in args.precision:
                    try:
                        peak, seconds = measure(name, setup, precision, args.size, args.batch, args.steps)
                        figures = f"{peak:>8.2f} {seconds:>7.3f}"
                    except torch.cuda.OutOfMemoryError:
                        figures = f"{'OOM':>8} {'-':>7}"
                    if rank == 0:
                        print(f"{name:<10} {setup:<19} {precision:<9} {figures}", flush=True)


if __name__ == "__main__":
    main()
