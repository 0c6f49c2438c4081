"""Memory and speed switches of the model config, against the plain network in the same run.

For each setting, one training step (forward + backward) of the network on a random volume: the activation
memory autograd keeps for the backward pass (measured with saved-tensor hooks, so it works on the CPU too), peak
GPU memory when on CUDA, and the step time. Prints each figure and its ratio to the plain network.

    python benchmarks/memory_options.py                                  # SegResNet (reference), 64^3, CPU/GPU
    python benchmarks/memory_options.py --model unet --size 96 96 64 --batch 2 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from seglight import SegModule

NETS = {
    "segresnet": {"_target_": "monai.networks.nets.SegResNet", "init_filters": 16, "dropout_prob": 0.2},
    "unet": {
        "_target_": "monai.networks.nets.UNet",
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
        "norm": "batch",
    },
    "dynunet": {
        "_target_": "monai.networks.nets.DynUNet",
        "kernel_size": [[3, 3, 3]] * 5,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
        "upsample_kernel_size": [[2, 2, 2]] * 4,
        "filters": [16, 32, 64, 128, 256],
        "res_block": True,
    },
}


def measure(net: dict, compute: dict, image: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(MB kept for backward, peak CUDA MB or 0, median seconds per step) for one setting."""
    module = SegModule(net=net, compute=compute).to(image.device).train()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(image).float().mean().backward()  # warm-up (and compilation), also counts the saved bytes
    cuda = image.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        module(image).float().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    return saved / 2**20, peak, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(NETS), default="segresnet")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="also time compute.compile=true (needs a compiler)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = {**NETS[args.model], "spatial_dims": 3, "in_channels": 1, "out_channels": 1}
    image = torch.rand(args.batch, 1, *args.size, device=device)
    settings = {
        "plain": {},
        "checkpointing": {"checkpointing": True},
        "channels_last": {"channels_last": True},
    }
    if args.compile:
        settings["compile"] = {"compile": True}
    print(f"{args.model} on {device}, batch {args.batch} x {args.size}, median of {args.steps} steps")
    base = None
    for name, switch in settings.items():
        torch.manual_seed(0)
        saved, peak, seconds = measure(net, switch, image, args.steps)
        base = base or (saved, peak, seconds)
        ratios = f"x{saved / base[0]:.2f} activations, x{seconds / base[2]:.2f} time"
        gpu = f", peak {peak:8.1f} MB (x{peak / base[1]:.2f})" if base[1] else ""
        print(f"  {name:14s} kept for backward {saved:8.1f} MB{gpu}, {seconds:6.3f} s/step  ({ratios})")


if __name__ == "__main__":
    main()
