"""Time to Dice: wall time until the first validation Dice >= 0.85, seglight's ``experiment=demo`` against the lab's
plain loop (``lab.py``: SegResNet, DiceLoss(sigmoid), Adam, uncached transforms) on the same demo cases, split and
settings (size, batch, learning rate, epochs, loader workers, precision).

Both clocks start before anything is read: seglight's covers ``seglight.train.train(cfg)`` as the command line runs
it (data check, caching, sanity check, checkpoints, logging); the lab's covers building its loaders and model. A run
stops at the first validation that reaches the target; one that never does within the epochs is reported as such.

    python benchmarks/time_to_dice.py                     # the demo as `make train` runs it, CPU or GPU
    python benchmarks/time_to_dice.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lab import lab_cases, train_lab
from results import Row, format_table, median, spread, write_results

from seglight import SegDataModule, compose
from seglight.train import train


class DiceClock(L.Callback):
    """Records each validation's Dice/val with the time it was reached, and stops at the target."""

    instances: list[DiceClock] = []

    def __init__(self, target: float) -> None:
        self.target = float(target)
        self.history: list[dict[str, float]] = []
        DiceClock.instances.append(self)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        dice = float(trainer.callback_metrics.get("Dice/val", float("nan")))
        self.history.append({"epoch": trainer.current_epoch, "at": time.perf_counter(), "dice": dice})
        if dice >= self.target:
            trainer.should_stop = True


def seglight_run(overrides: Sequence[str], run_dir: Path, target: float) -> dict[str, Any]:
    """``experiment=demo`` through seglight.train's own function; seconds to the target and the history."""
    clock = f"{DiceClock.__module__}.DiceClock"
    cfg = compose(
        [*overrides, f"+callbacks.dice_clock={{_target_:{clock},target:{target}}}"], output_dir=run_dir
    )
    start = time.perf_counter()
    train(cfg)
    history = [{**h, "seconds": h["at"] - start} for h in DiceClock.instances[-1].history]
    return {"history": history, "seconds": _first_at(history, target), "split": str(run_dir / "split.json")}


def lab_run(
    split_path: str, data: SegDataModule, target: float, epochs: int, lr: float, device: str, amp: bool
) -> dict[str, Any]:
    """The lab's loop on the cases of seglight's split; seconds to the target and the history."""
    split = json.loads(Path(split_path).read_text())
    train_cases, val_cases = lab_cases(split, data.read_cases())
    history = train_lab(
        train_cases,
        val_cases,
        data.settings.spatial_size,
        max_epochs=epochs,
        lr=lr,
        batch_size=data.batch_size,
        workers=data.num_workers,
        init_filters=16,
        device=device,
        amp=amp,
        on_epoch=lambda epoch, seconds, dice: dice >= target,
    )
    return {"history": history, "seconds": _first_at(history, target)}


def _first_at(history: Sequence[dict[str, float]], target: float) -> float | None:
    return next((h["seconds"] for h in history if h["dice"] >= target), None)


def run(
    target: float = 0.85,
    repeats: int = 1,
    overrides: Sequence[str] = (),
) -> tuple[list[Row], dict[str, Any]]:
    """Alternating runs (seglight, lab, ...) of the demo set-up; one row with the median seconds to the target."""
    logging.getLogger("seglight").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ours, labs = [], []
    with tempfile.TemporaryDirectory(prefix="seglight-bench-dice-") as tmp:
        base = ["experiment=demo", f"data.demo.cache_dir={tmp}/demo", *overrides]
        cfg = compose(base, output_dir=Path(tmp) / "probe")
        gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto")
        device = "cuda" if gpu else "cpu"
        amp = gpu and str(cfg.trainer.precision).startswith("16")
        data = SegDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
        for repeat in range(repeats):
            with (
                open(os.devnull, "w") as sink,
                contextlib.redirect_stderr(sink),
                contextlib.redirect_stdout(sink),
            ):
                result = seglight_run(base, Path(tmp) / f"run{repeat}", target)
                ours.append(result)
                labs.append(
                    lab_run(
                        result["split"], data, target, cfg.trainer.max_epochs, cfg.optimizer.lr, device, amp
                    )
                )
    reached = [(o["seconds"], r["seconds"]) for o, r in zip(ours, labs, strict=True)]
    speedups = [r / o for o, r in reached if o and r]
    setting = (
        f"experiment=demo {' '.join(overrides)}".strip()
        + f" on {device}, target Dice {target}, {repeats} repeat(s)"
    )
    missed = [
        name for name, runs in (("seglight", ours), ("lab", labs)) if any(r["seconds"] is None for r in runs)
    ]
    row = Row(
        f"time to Dice >= {target}",
        "s",
        median([o for o, _ in reached]),
        median([r for _, r in reached]),
        lower_is_better=True,
        spread=spread(speedups),
        notes=setting + (f"; not reached in some runs by: {', '.join(missed)}" if missed else ""),
    )
    # The split files lived in the temporary folder: the figures keep the histories only.
    ours = [{k: v for k, v in o.items() if k != "split"} for o in ours]
    details = {"setting": setting, "seglight": ours, "lab": labs}
    return [row], details


def main() -> None:
    """Measure, print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more seglight overrides, e.g. trainer.max_epochs=30")
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows, details = run(args.target, args.repeats, args.overrides)
    for name in ("seglight", "lab"):
        for number, result in enumerate(details[name], start=1):
            curve = ", ".join(f"{h['seconds']:.0f}s:{h['dice']:.3f}" for h in result["history"])
            print(f"{name} run {number}: {curve}")
    print(format_table(rows))
    print(f"Figures: {write_results('time_to_dice', rows, details, args.results_dir)}")


if __name__ == "__main__":
    main()
