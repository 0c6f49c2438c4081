"""Training-loader throughput: seglight's cached pipeline against the lab's uncached MONAI pipeline.

Both read the same demo cases with the same batch size and worker count; the reference is the lab's
``monai.data.Dataset`` + ``DataLoader`` (see ``lab.py``). seglight's first epoch includes its set-up (reading,
checking and preprocessing every case once); from the second epoch on only the random flip runs. Prints samples/s
per epoch and the ratio (target: at least 20x from the second epoch on, the second epoch included).

Each round runs the reference's epoch first: its loader forks worker processes from this process, and the first
time seglight's loader then writes to memory it shares with them, the kernel copies those pages (copy-on-write).
Forked right before seglight's second epoch, that one-off cost used to land there; in training, seglight's process
forks no loader workers at all (a thread assembles the batches).

    python benchmarks/loader_throughput.py                       # 24 cases, 6 epochs, 2 workers, cache=memory
    python benchmarks/loader_throughput.py --cache disk --cases 24 --workers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lab import lab_loader
from results import Row, format_table, median, spread, write_results
from torch.utils.data import DataLoader

from seglight import SegDataModule
from seglight.data.demo import ensure_demo_dataset

SIZE = (128, 128, 64)


def epoch_rate(loader: DataLoader, extra_seconds: float = 0.0) -> float:
    """Samples per second of one pass over ``loader`` (plus ``extra_seconds`` of set-up charged to it)."""
    start = time.perf_counter()
    samples = 0
    for batch in loader:
        samples += batch["image"].shape[0]
    return samples / (time.perf_counter() - start + extra_seconds)


def measure(
    cache_dir: Path,
    cases: int,
    shape: list[int],
    size: tuple[int, ...],
    epochs: int,
    workers: int,
    batch_size: int,
    cache: str,
    repeat: int = 0,
) -> dict[str, Any]:
    """One side-by-side run: samples/s per epoch of both pipelines (a fresh preprocessing cache per repeat)."""
    demo = dict(cache_dir=str(cache_dir / "demo"), num_cases=cases, shape=shape)
    ensure_demo_dataset(**demo)
    start = time.perf_counter()
    dm = SegDataModule(
        demo=demo,
        spatial_size=size,
        batch_size=batch_size,
        num_workers=workers,
        cache=cache,
        cache_dir=str(cache_dir / f"preprocessed-{repeat}"),
        split_path=str(cache_dir / "split.json"),
    )
    dm.setup("fit")
    setup_seconds = time.perf_counter() - start
    ours_loader = dm.train_dataloader()
    ref_loader = lab_loader(dm.train_cases, size, batch_size, workers)
    # Epochs alternate between the two pipelines, so a change in the machine's load hits both alike.
    ours, ref = [], []
    for epoch in range(epochs):
        ref.append(epoch_rate(ref_loader))
        ours.append(epoch_rate(ours_loader, setup_seconds if epoch == 0 else 0.0))
    return {
        "seglight": ours,
        "reference": ref,
        "training_cases": len(dm.train_cases),
        "setup_s": setup_seconds,
    }


def run(
    cases: int = 24,
    shape: tuple[int, ...] = (96, 96, 48),
    size: tuple[int, ...] = SIZE,
    epochs: int = 6,
    workers: int = 2,
    batch_size: int = 2,
    cache: str = "memory",
    repeats: int = 1,
    cache_dir: str | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """``repeats`` side-by-side runs; rows for epoch 2 and for the median from epoch 2 on (medians over repeats)."""
    # One torch thread per process, as DataLoader gives its workers: the comparison is of the pipelines, not of
    # how well an intra-op thread pool copes with the cores being shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="seglight-bench-loader-") as tmp:
            folder = Path(cache_dir or tmp)
            runs = [
                measure(folder, cases, list(shape), size, epochs, workers, batch_size, cache, repeat)
                for repeat in range(repeats)
            ]
    finally:
        torch.set_num_threads(threads)
    epoch2 = [r["seglight"][1] / r["reference"][1] for r in runs] if epochs > 1 else []
    later = [
        median([s / f for s, f in zip(r["seglight"][1:], r["reference"][1:], strict=True)]) for r in runs
    ]
    setting = (
        f"{runs[0]['training_cases']} cases {'x'.join(map(str, shape))} -> {'x'.join(map(str, size))}, "
        f"batch {batch_size}, {workers} workers, cache={cache}, {repeats} repeat(s)"
    )
    rows = []
    if epochs > 1:
        rows.append(
            Row(
                "loader, epoch 2",
                "samples/s",
                median([r["seglight"][1] for r in runs]),
                median([r["reference"][1] for r in runs]),
                goal=">= 20x",
                goal_ratio=20.0,
                spread=spread(epoch2),
                notes=setting,
            )
        )
        rows.append(
            Row(
                "loader, epochs 2+ (median)",
                "samples/s",
                median([median(r["seglight"][1:]) for r in runs]),
                median([median(r["reference"][1:]) for r in runs]),
                goal=">= 20x",
                goal_ratio=20.0,
                spread=spread(later),
            )
        )
    details = {"setting": setting, "runs": runs, "epoch2_ratios": epoch2, "median_ratios_from_epoch2": later}
    return rows, details


def print_epochs(details: dict[str, Any]) -> None:
    """Samples/s epoch by epoch, for each repeat."""
    print(f"\nLoader throughput per epoch: {details['setting']}")
    print(
        f"{'repeat':>6}  {'epoch':>5}  {'reference (samples/s)':>22}  {'seglight (samples/s)':>21}  {'ratio':>7}"
    )
    for number, result in enumerate(details["runs"], start=1):
        for epoch, (r, s) in enumerate(zip(result["reference"], result["seglight"], strict=True), start=1):
            print(f"{number:>6}  {epoch:>5}  {r:>22.1f}  {s:>21.1f}  {s / r:>6.1f}x")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``run``."""
    parser.add_argument("--cases", type=int, default=24, help="demo cases (training uses 80%% of them)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48], help="voxels of the demo scans")
    parser.add_argument("--size", type=int, nargs=3, default=list(SIZE), help="size the pipelines resize to")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cache", default="memory", choices=["memory", "disk", "none"])
    parser.add_argument("--repeats", type=int, default=1)


def main() -> None:
    """Measure both pipelines, print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--cache-dir", default=None, help="where the demo data and caches go (default: temp)")
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    rows, details = run(
        args.cases,
        tuple(args.shape),
        tuple(args.size),
        args.epochs,
        args.workers,
        args.batch_size,
        args.cache,
        args.repeats,
        args.cache_dir,
    )
    print_epochs(details)
    print()
    print(format_table(rows))
    print(f"Figures: {write_results('loader', rows, details, args.results_dir)}")


if __name__ == "__main__":
    main()
