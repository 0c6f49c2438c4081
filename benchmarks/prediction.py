"""Prediction throughput: ``seglight.predict`` against a bare ``sliding_window_inference`` + ``nibabel.save`` loop
(``lab.py``), with the same weights, on the same demo scans, both writing a mask in each scan's own grid.

seglight's figure is ``seglight.prediction.cases.predict`` as ``python -m seglight.predict`` calls it (checkpoint loading,
preprocessing, windows, inversion to the scan's geometry, atomic NIfTI writes); the bare loop loads the same weights
into the lab's network. Volumes per second, alternating runs, median over ``--repeats``.

    python benchmarks/prediction.py                       # 8 demo scans, the demo's size, CPU or GPU
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lab import lab_model, predict_lab
from results import Row, format_table, median, spread, write_results

from seglight import build, compose
from seglight.prediction.cases import predict


def make_checkpoint(overrides: Sequence[str], run_dir: Path) -> Path:
    """A checkpoint of the demo model after one training step (the weights do not matter for speed)."""
    cfg = compose(
        [*overrides, "trainer.max_epochs=1", "+trainer.max_steps=1", "+trainer.limit_val_batches=0"],
        output_dir=run_dir,
    )
    datamodule, module, trainer = build(cfg)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        trainer.fit(module, datamodule=datamodule)
    path = run_dir / "benchmark.ckpt"
    trainer.save_checkpoint(path)
    return path


def seglight_predict(ckpt: Path, inputs: Path, output: Path, device: str) -> float:
    """Seconds for ``seglight.predict`` over the folder ``inputs``."""
    start = time.perf_counter()
    report = predict(ckpt=ckpt, input=inputs, output=output, device=device)
    report.raise_for_failures()
    return time.perf_counter() - start


def lab_predict(
    ckpt: Path, images: Sequence[str], output: Path, size: Sequence[int], filters: int, device: str
) -> float:
    """Seconds for the bare loop over ``images``, the same weights loaded into the lab's network."""
    start = time.perf_counter()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = lab_model(filters)
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    predict_lab(model, images, output, size, device=device, amp=device.startswith("cuda"))
    return time.perf_counter() - start


def run(
    volumes: int = 8,
    repeats: int = 3,
    overrides: Sequence[str] = (),
    device: str = "auto",
) -> tuple[list[Row], dict[str, Any]]:
    """Alternating runs of both over the same scans; one row with the median volumes per second."""
    logging.getLogger("seglight").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, bare = [], []
    with tempfile.TemporaryDirectory(prefix="seglight-bench-predict-") as tmp:
        base = ["experiment=demo", f"data.demo.cache_dir={tmp}/demo", "data.num_workers=0", *overrides]
        if device == "cpu":
            base.append("trainer=cpu")
        ckpt = make_checkpoint(base, Path(tmp) / "train")
        cfg = compose(base, output_dir=Path(tmp) / "probe")
        scans = sorted((Path(tmp) / "demo").rglob("imagesTr/*.nii.gz"))[:volumes]
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        for scan in scans:
            (inputs / scan.name).symlink_to(scan)
        size, filters = list(cfg.data.spatial_size), int(cfg.model.init_filters)
        for repeat in range(repeats):
            ours.append(len(scans) / seglight_predict(ckpt, inputs, Path(tmp) / f"ours{repeat}", device))
            images = [str(s) for s in sorted(inputs.iterdir())]
            bare.append(
                len(scans) / lab_predict(ckpt, images, Path(tmp) / f"bare{repeat}", size, filters, device)
            )
    setting = f"{len(scans)} demo scans -> {'x'.join(map(str, size))}, SegResNet {filters} filters, {device}"
    row = Row(
        "prediction",
        "volumes/s",
        median(ours),
        median(bare),
        spread=spread([o / b for o, b in zip(ours, bare, strict=True)]),
        notes=f"{setting}, {repeats} repeat(s)",
    )
    return [row], {"setting": setting, "seglight_volumes_per_s": ours, "bare_volumes_per_s": bare}


def main() -> None:
    """Measure, print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="seglight overrides of the demo set-up")
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows, details = run(args.volumes, args.repeats, args.overrides, args.device)
    print(format_table(rows))
    print(f"Figures: {write_results('prediction', rows, details, args.results_dir)}")


if __name__ == "__main__":
    main()
