"""Step overhead: seconds per training step through seglight against a raw PyTorch loop on the same batches held in
memory, two ways, in the same run:

- **real path**, what users run: ``compose(["experiment=demo", ...])`` + ``build`` + ``trainer.fit`` with the data
  module's loader (cache, seeded sampler, random flip, collation; pinned copies on a GPU), the default callbacks of
  ``conf/callbacks/default.yaml`` and the default loggers, validation off;
- **bare Trainer**, what the framework adds: the same Trainer (the same callbacks and loggers) fed the real path's
  batches from a list, ready-made.

Step period: the time between successive ``on_train_batch_start`` calls within epochs 2 and up (the first epoch warms
up; ``--epochs`` are timed), the median over the steps. On a GPU the host may run ahead of the device, so there the
device is synchronised at the first and last step of each timed epoch (nowhere else) and an epoch's steps count as
the time between those two over the steps in between; the median over the epochs. The raw loop: a copy of the network
from the same initial weights, the configured loss (``DiceLoss(sigmoid=True)``), the same optimiser class and settings,
autocast and a GradScaler at 16-bit, ``loss.item()`` per step, on the batches the real path trained on in its first
epoch (held where the step runs), the median step period after two warm-up steps. Each repeat runs real, raw, bare in
turn from the same initial weights; a row's ratio is the median, its spread the range, of the repeats' ratios against
their own raw loop. Goal: the real path at most 3 % slower than the raw loop on the CPU.

    python benchmarks/step_overhead.py                           # experiment=demo as composed, on the CPU
    python benchmarks/step_overhead.py --repeats 5 --epochs 3
    python benchmarks/step_overhead.py --device cuda --precision 16-mixed
    python benchmarks/step_overhead.py data.batch_size=4         # any further config override
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from results import Row, format_table, median, spread, write_results
from torch.utils.data import DataLoader

from seglight import build, compose


class ListOfBatches(torch.utils.data.Dataset):
    """Ready-made batches, one per index (a DataLoader with ``batch_size=None`` serves them as they are)."""

    def __init__(self, batches: Sequence[dict]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


class StepClock(L.Callback):
    """Clocks every ``on_train_batch_start`` from epoch ``first_epoch`` on, and keeps a copy of the batches before it.

    The device is synchronised at the first and last step of each timed epoch only (a no-op on the CPU).
    """

    def __init__(self, first_epoch: int = 1) -> None:
        self.first_epoch = first_epoch
        self.starts: dict[int, list[float]] = {}
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if epoch < self.first_epoch:
            self.batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
            return
        if batch_idx in (0, trainer.num_training_batches - 1):
            synchronize(pl_module.device)
        self.starts.setdefault(epoch, []).append(time.perf_counter())

    def seconds_per_step(self, device: torch.device) -> float:
        """The step period (see the module's docstring)."""
        epochs = [starts for starts in self.starts.values() if len(starts) > 1]
        if not epochs:
            raise RuntimeError("no timed epoch had two steps: raise --epochs or the number of cases")
        if device.type == "cuda":
            return statistics.median((s[-1] - s[0]) / (len(s) - 1) for s in epochs)
        return statistics.median(b - a for s in epochs for a, b in zip(s, s[1:], strict=False))


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_overrides(epochs: int, precision: str, device: str) -> list[str]:
    """The real path: ``experiment=demo`` as composed, on ``device``, validation off, one warm-up epoch."""
    return [
        "experiment=demo",
        f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}",
        f"trainer.precision={precision}",
        "data.num_workers=0",
        f"trainer.max_epochs={1 + epochs}",
        "+trainer.limit_val_batches=0",
        "+trainer.num_sanity_val_steps=0",
    ]


@contextlib.contextmanager
def quiet() -> Any:
    """The progress bar and the epoch lines are drawn as usual, into /dev/null."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        yield


def real_path(cfg: Any, seed: int) -> tuple[float, dict[str, Any], L.Trainer, list[dict[str, torch.Tensor]]]:
    """Seconds per step of ``build(cfg)`` + ``fit`` with its data module; the initial weights, the trainer (its
    module, optimiser and precision) and the first epoch's batches."""
    torch.manual_seed(seed)
    datamodule, module, trainer = build(cfg)
    initial = copy.deepcopy(module.net.state_dict())
    clock = StepClock()
    trainer.callbacks.append(clock)
    with quiet():
        trainer.fit(module, datamodule=datamodule)
    return clock.seconds_per_step(module.device), initial, trainer, clock.batches


def bare_trainer(cfg: Any, initial: dict[str, Any], batches: Sequence[dict]) -> float:
    """Seconds per step of the same Trainer fed ``batches`` from a list, as many per epoch as the real path's."""
    _, module, trainer = build(cfg)
    module.net.load_state_dict(initial)
    clock = StepClock()
    trainer.callbacks.append(clock)
    loader = DataLoader(ListOfBatches(batches), batch_size=None, shuffle=False)
    with quiet():
        trainer.fit(module, train_dataloaders=loader)
    return clock.seconds_per_step(module.device)


def raw_loop(trainer: L.Trainer, initial: dict[str, Any], batches: Sequence[dict], warmup: int = 2) -> float:
    """Seconds per step of a plain loop over ``batches`` (twice) with the trainer's network, loss, optimiser
    settings and precision, from the ``initial`` weights: forward, loss, backward, step, ``loss.item()``."""
    module = trainer.lightning_module
    net = copy.deepcopy(module.net)
    net.load_state_dict(initial)
    net.train()
    device = next(net.parameters()).device
    loss_fn = copy.deepcopy(module.loss_fn)
    like = trainer.optimizers[0]
    optimizer = type(like)(net.parameters(), **like.defaults)
    precision = str(trainer.precision)  # what the trainer ran at (a CPU falls back to 32)
    half = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    starts = []
    for batch in [*batches, *batches]:
        starts.append(time.perf_counter())
        image, label = batch["image"], batch["label"].float()
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss = loss_fn(net(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the reference loop reads its loss every step (a wait for the device)
    starts.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False))


def run(
    overrides: Sequence[str] = (),
    epochs: int = 2,
    repeats: int = 3,
    precision: str | None = None,
    device: str = "cpu",
) -> tuple[list[Row], dict[str, Any]]:
    """Alternating repeats of the real path, the raw loop and the bare Trainer; a row for each against the raw loop.

    ``overrides`` go after the benchmark's own (toy sizes for a smoke run, another batch size, ...).
    """
    logging.getLogger("seglight").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    precision = precision or ("16-mixed" if device.startswith("cuda") else "32")
    real, bare, raw, loads = [], [], [], []
    steps = 0
    with tempfile.TemporaryDirectory(prefix="seglight-bench-steps-") as tmp:
        for repeat in range(repeats):
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            options = [*config_overrides(epochs, precision, device), *overrides]
            cfg = compose(options, output_dir=Path(tmp) / f"real{repeat}")
            seconds, initial, trainer, batches = real_path(cfg, seed=repeat)
            real.append(seconds)
            raw.append(raw_loop(trainer, initial, batches))
            cfg = compose(options, output_dir=Path(tmp) / f"bare{repeat}")
            bare.append(bare_trainer(cfg, initial, batches))
            loads.append((load, os.getloadavg()[0] if hasattr(os, "getloadavg") else None))
            steps = len(batches)
            del trainer, batches
    setting = (
        f"experiment=demo {' '.join(overrides)}".strip()
        + f", {precision}, {device}, {steps} steps per epoch, {epochs} timed epoch(s), {repeats} repeat(s)"
    )
    load_note = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in loads if a is not None and b is not None)
    rows = [
        _row(
            "step time, real path (seglight / raw loop)",
            real,
            raw,
            "data module, default callbacks and loggers",
        ),
        _row(
            "step time, bare Trainer (seglight / raw loop)", bare, raw, "the real path's batches from a list"
        ),
    ]
    rows[0].notes += f"; {setting}; load average per repeat {load_note or 'n/a'}"
    details = {
        "setting": setting,
        "real_path_s_per_step": real,
        "bare_trainer_s_per_step": bare,
        "raw_s_per_step": raw,
        "real_time_ratios": [s / r for s, r in zip(real, raw, strict=True)],
        "bare_time_ratios": [s / r for s, r in zip(bare, raw, strict=True)],
        "load_average_before_after": loads,
    }
    return rows, details


def _row(name: str, ours: list[float], raw: list[float], what: str) -> Row:
    speed = [
        r / s for s, r in zip(ours, raw, strict=True)
    ]  # raw/seglight: the table's ratio (1.00x: no overhead)
    return Row(
        name,
        "s/step",
        median(ours),
        median(raw),
        lower_is_better=True,
        goal="<= 1.03x time",
        goal_ratio=1 / 1.03,
        spread=spread(speed),
        notes=f"{what}; ratio = raw/seglight speed, the median of the repeats",
        extra={"ratio_per_repeat": speed},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of ``run``."""
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default=None, choices=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (16-mixed unless --precision says)")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. data.batch_size=4")


def main() -> None:
    """Measure, print the table and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows, details = run(args.overrides, args.epochs, args.repeats, args.precision, args.device)
    print(format_table(rows))
    print(f"Figures: {write_results('step_overhead', rows, details, args.results_dir)}")


if __name__ == "__main__":
    main()
