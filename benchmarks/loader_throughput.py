"""Training-loader throughput: seglight's cached pipeline against the lab's uncached MONAI pipeline.

Both read the same demo cases with the same batch size and worker count; the reference is ``monai.data.Dataset``
+ ``DataLoader`` with LoadImaged, EnsureChannelFirstd, Resized to 128x128x64, ScaleIntensityRanged(-1000, 1000,
0, 1, clip) and RandFlipd(prob 0.5, axis 0). seglight's first epoch includes its set-up (reading, checking and
preprocessing every case once); from the second epoch on only the random flip runs. Prints samples/s per epoch
and the ratio (target: at least 20x from the second epoch on).

    python benchmarks/loader_throughput.py                       # 24 cases, 6 epochs, 2 workers, cache=memory
    python benchmarks/loader_throughput.py --cache disk --cases 24 --workers 4
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from monai import transforms as mt
from monai.data import DataLoader, Dataset

from seglight import SegDataModule
from seglight.data.demo import ensure_demo_dataset

SIZE = (128, 128, 64)


def reference_loader(cases: list[dict], batch_size: int, workers: int) -> DataLoader:
    """The lab's pipeline: every step runs on every access."""
    keys = ["image", "label"]
    transform = mt.Compose(
        [
            mt.LoadImaged(keys=keys),
            mt.EnsureChannelFirstd(keys=keys),
            mt.Resized(keys=keys, spatial_size=SIZE),
            mt.ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        ]
    )
    data = [{"image": c["image"], "label": c["label"]} for c in cases]
    return DataLoader(
        Dataset(data, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def epoch_rate(loader: DataLoader, extra_seconds: float = 0.0) -> float:
    """Samples per second of one pass over ``loader`` (plus ``extra_seconds`` of set-up charged to it)."""
    start = time.perf_counter()
    samples = 0
    for batch in loader:
        samples += batch["image"].shape[0]
    return samples / (time.perf_counter() - start + extra_seconds)


def main() -> None:
    """Measure both pipelines and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="demo cases (training uses 80%% of them)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48], help="voxels of the demo scans")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cache", default="memory", choices=["memory", "disk", "none"])
    parser.add_argument("--cache-dir", default=None, help="where the demo data and caches go (default: temp)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    # One torch thread per process, as DataLoader gives its workers: the comparison is of the pipelines, not of
    # how well an intra-op thread pool copes with the cores being shared.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="seglight-bench-") as tmp:
        cache_dir = Path(args.cache_dir or tmp)
        demo = dict(cache_dir=str(cache_dir / "demo"), num_cases=args.cases, shape=args.shape)
        ensure_demo_dataset(**demo)

        start = time.perf_counter()
        dm = SegDataModule(
            demo=demo,
            spatial_size=SIZE,
            batch_size=args.batch_size,
            num_workers=args.workers,
            cache=args.cache,
            cache_dir=str(cache_dir / "preprocessed"),
            split_path=str(Path(tmp) / "split.json"),
        )
        dm.setup("fit")
        setup_seconds = time.perf_counter() - start
        ours_loader = dm.train_dataloader()
        ref_loader = reference_loader(dm.train_cases, args.batch_size, args.workers)
        # Epochs alternate between the two pipelines, so a change in the machine's load hits both alike.
        ours, ref = [], []
        for epoch in range(args.epochs):
            ours.append(epoch_rate(ours_loader, setup_seconds if epoch == 0 else 0.0))
            ref.append(epoch_rate(ref_loader))
        num_train = len(dm.train_cases)

    print(
        f"\nLoader throughput, {num_train} training cases of {'x'.join(map(str, args.shape))} "
        f"voxels resized to {'x'.join(map(str, SIZE))}, batch {args.batch_size}, {args.workers} workers, "
        f"seglight cache={args.cache}"
    )
    print(f"{'epoch':>5}  {'reference (samples/s)':>22}  {'seglight (samples/s)':>21}  {'ratio':>7}")
    for epoch, (r, s) in enumerate(zip(ref, ours, strict=True), start=1):
        print(f"{epoch:>5}  {r:>22.1f}  {s:>21.1f}  {s / r:>6.1f}x")
    if args.epochs > 1:
        steady = statistics.median(s / r for r, s in zip(ref[1:], ours[1:], strict=True))
        print(f"Median ratio from epoch 2 on: {steady:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
