"""The lab's setting on a GPU: seglight against the lab's plain loop on the same GPU, and what the GPU does meanwhile.

The demo data is generated at CT-like size (``--scan-shape``, default 512x512x96) and trained in the lab's setting:
SegResNet (16 filters), 128x128x64, batch 2, Adam, training steps only (validation off). For each configuration
(precision 32 / 16-mixed / bf16-mixed, with and without ``channels_last`` and ``compile``) it measures, from the
second epoch to the end (the first one warms up and compiles):

- steps per second, against the lab's loop (``lab.py``: uncached MONAI pipeline, loader workers, 16-bit autocast
  with a GradScaler, ``loss.item()`` per step) on the same GPU;
- peak GPU memory (``torch.cuda.max_memory_allocated``);
- the share of wall time the GPU was busy, sampled through NVML (``pip install nvidia-ml-py``; n/a without it);
- the share of the time between steps, when the next batch is fetched (waiting for data, as seen by the host);
- host-device synchronisations per step (``torch.cuda.set_sync_debug_mode``, for the default configuration);
- seglight's step time against a raw PyTorch loop on the same batches (``step_overhead.py``) at ``16-mixed``.

Goals for the lab's setting (16-mixed): GPU busy >= 95 %, peak memory <= 4 GB, steps/s >= 1.5x the lab's loop.
Without CUDA it prints one line and exits 0 (``--device cpu --tiny`` runs the same code at toy sizes, to test it).

    python benchmarks/gpu.py                                # full grid, ~24 scans; see --help to trim it
    python benchmarks/gpu.py --precisions 16-mixed bf16-mixed --no-compile
"""

from __future__ import annotations

import argparse
import sys

import torch

PRECISIONS = ("32", "16-mixed", "bf16-mixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N; cpu only to test this script")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (to test the script, not to measure)")
    parser.add_argument("--cases", type=int, default=24, help="demo scans (80%% train)")
    parser.add_argument("--scan-shape", type=int, nargs=3, default=[512, 512, 96], help="voxels of each scan")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 64], help="the network's input size")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6, help="the first warms up; the rest are timed")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last variants")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--lab-workers", type=int, default=4, help="the lab's DataLoader workers")
    parser.add_argument(
        "--overhead-steps", type=int, default=40, help="steps of the raw-loop comparison (0: skip)"
    )
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args(argv)
    if args.tiny:  # one configuration, no raw-loop rerun (step_overhead.py has its own smoke run)
        args.cases, args.scan_shape, args.size, args.epochs = 6, [24, 24, 16], [16, 16, 16], 2
        args.overhead_steps, args.no_channels_last = 0, True
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table, or say in one line why not."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py: skipped: no CUDA GPU here (torch {torch.__version__}); GPU figures stay open"
        )
        return 0
    from gpu_measure import measure_all  # the heavy imports, only where there is something to measure
    from results import format_table, write_results

    rows, details = measure_all(args)
    print(format_table(rows, title=f"\nGPU benchmark: {details['setting']}"))
    print(f"Figures: {write_results('gpu', rows, details, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
