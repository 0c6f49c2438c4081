"""Step overhead: a training step through seglight (Lightning Trainer, logging, callbacks, progress bar, checkpoint
policy) against a raw PyTorch loop on the same network, batches, loss, optimiser and precision.

Both train from the same initial weights on the same pre-made batches (seglight's own, served from a list so that
the loaders do not differ) for one epoch of ``--steps`` steps; the time per step is the wall time from the start of
step ``--warmup`` to the end of the last step (the device synchronised at both ends only), so whatever the framework
does per step, and any wait for the device it forces, is counted. Runs alternate (seglight, raw, seglight, ...) and
the ratio is the median over ``--repeats``. Goal: seglight at most 3 % slower.

    python benchmarks/step_overhead.py                                   # demo size 64x64x32, CPU at 32-bit
    python benchmarks/step_overhead.py --size 128 128 64 --precision 16-mixed --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from results import Row, format_table, median, spread, write_results
from torch.utils.data import DataLoader

from seglight import SegDataModule, build, compose


class ListOfBatches(torch.utils.data.Dataset):
    """Ready-made batches, one per index (a DataLoader with ``batch_size=None`` serves them as they are)."""

    def __init__(self, batches: Sequence[dict]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


class StepClock(L.Callback):
    """Times steps ``warmup``..last of the fit, synchronising the device at those two points only."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.seconds: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.start is not None and batch_idx == trainer.num_training_batches - 1:
            synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start
            self.steps = batch_idx - self.warmup + 1


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_overrides(
    size: Sequence[int], batch_size: int, init_filters: int, precision: str, device: str
) -> list[str]:
    """seglight's demo set-up at this size, training only (no validation), on ``device``."""
    return [
        "experiment=demo",
        f"data.spatial_size=[{','.join(map(str, size))}]",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        f"model.init_filters={init_filters}",
        "trainer.max_epochs=1",
        "+trainer.limit_val_batches=0",
        "+trainer.num_sanity_val_steps=0",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}",
    ]


def seglight_steps(cfg: Any, batches: Sequence[dict], warmup: int, initial: dict) -> tuple[float, Any]:
    """Seconds per step through seglight's Trainer, and the optimiser it built."""
    _, module, trainer = build(cfg)
    module.net.load_state_dict(initial)
    clock = StepClock(warmup)
    trainer.callbacks.append(clock)
    loader = DataLoader(ListOfBatches(batches), batch_size=None, shuffle=False)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        # The progress bar and the model summary are drawn as usual, into /dev/null.
        trainer.fit(module, train_dataloaders=loader)
    assert clock.seconds is not None, "the step clock did not run"
    return clock.seconds / clock.steps, trainer.optimizers[0]


def raw_steps(
    net: torch.nn.Module,
    loss_fn: Any,
    optimizer_like: torch.optim.Optimizer,
    batches: Sequence[dict],
    warmup: int,
    device: torch.device,
    precision: str,
) -> float:
    """Seconds per step of a plain loop: to device, forward, loss, backward, optimiser step."""
    net = net.to(device).train()
    optimizer = type(optimizer_like)(net.parameters(), **optimizer_like.defaults)
    half = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    loader = DataLoader(ListOfBatches(batches), batch_size=None, shuffle=False)
    start = None
    for index, batch in enumerate(loader):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss = loss_fn(net(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    assert start is not None
    return (time.perf_counter() - start) / (len(batches) - warmup)


def run(
    size: Sequence[int] = (64, 64, 32),
    batch_size: int = 2,
    init_filters: int = 16,
    steps: int = 8,
    warmup: int = 2,
    repeats: int = 3,
    precision: str = "32",
    device: str = "cpu",
    demo_shape: Sequence[int] = (96, 96, 48),
    demo_cases: int = 12,
) -> tuple[list[Row], dict[str, Any]]:
    """Alternating runs of both; one row with the median seconds per step of each."""
    logging.getLogger("seglight").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ours, raw = [], []
    with tempfile.TemporaryDirectory(prefix="seglight-bench-steps-") as tmp:
        demo = {"cache_dir": f"{tmp}/demo", "num_cases": demo_cases, "shape": list(demo_shape)}
        overrides = config_overrides(size, batch_size, init_filters, precision, device) + [
            f"data.demo.cache_dir={tmp}/demo",
            f"data.demo.num_cases={demo_cases}",
            f"data.demo.shape=[{','.join(map(str, demo_shape))}]",
        ]
        data = SegDataModule(
            demo=demo, spatial_size=size, batch_size=batch_size, num_workers=0, split_path=f"{tmp}/split.json"
        )
        data.setup("fit")
        batches = list(islice(cycle(data.train_dataloader()), steps))
        for repeat in range(repeats):
            cfg = compose(overrides, output_dir=Path(tmp) / f"run{repeat}")
            torch.manual_seed(repeat)
            _, module, _ = build(cfg)
            initial = copy.deepcopy(module.net.state_dict())
            seconds, optimizer = seglight_steps(cfg, batches, warmup, initial)
            ours.append(seconds)
            net = copy.deepcopy(module.net)
            net.load_state_dict(initial)
            raw.append(
                raw_steps(net, module.loss_fn, optimizer, batches, warmup, torch.device(device), precision)
            )
    ratios = [s / r for s, r in zip(ours, raw, strict=True)]
    setting = (
        f"SegResNet {init_filters} filters, batch {batch_size} x {'x'.join(map(str, size))}, {precision}, "
        f"{device}, {steps - warmup} timed steps, {repeats} repeat(s)"
    )
    row = Row(
        "step time (seglight / raw loop)",
        "s/step",
        median(ours),
        median(raw),
        lower_is_better=True,
        goal="<= 1.03x time",
        goal_ratio=1 / 1.03,
        spread=spread([1 / r for r in ratios]),
        notes=f"{setting}; ratio = raw/seglight speed (1.00x: no overhead)",
    )
    details = {"setting": setting, "seglight_s_per_step": ours, "raw_s_per_step": raw, "time_ratios": ratios}
    return [row], details


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``run``."""
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--filters", type=int, default=16, help="SegResNet init_filters")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--device", default="cpu")


def main() -> None:
    """Measure, print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows, details = run(
        args.size,
        args.batch_size,
        args.filters,
        args.steps,
        args.warmup,
        args.repeats,
        args.precision,
        args.device,
    )
    print(format_table(rows))
    print(f"Figures: {write_results('step_overhead', rows, details, args.results_dir)}")


if __name__ == "__main__":
    main()
