"""The measurements of ``gpu.py``: seglight's configurations and the lab's loop on one device, timed from the
second epoch on, with peak memory, NVML busy share, time between steps and host syncs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import step_overhead
import torch
from lab import train_lab
from results import Row

from seglight import compose
from seglight.config.builder import build_module, build_trainer

DEFAULT = ("16-mixed", False, False)  # the lab's setting: the configuration the goals are for


class BusySampler:
    """The share of time the GPU ran a kernel, sampled through NVML in a thread; None where NVML is missing."""

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.interval = interval
        self.handle: Any = None
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else None
            except pynvml.NVMLError:
                self.handle = None
            if self.handle is None:  # the same numbering as CUDA's when CUDA_VISIBLE_DEVICES is unset
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no nvidia-ml-py, or no driver library
            self.handle = None

    def start(self) -> None:
        if self.handle is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def stop(self) -> float | None:
        """The mean busy share since ``start`` (0..1), or None."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


class WindowClock(L.Callback):
    """Times the fit from the first step of ``start_epoch`` to the end of the last step (the device synchronised
    at those two points only), sums the host time between steps, samples GPU busy and counts host syncs."""

    def __init__(self, start_epoch: int, sampler: BusySampler, count_syncs: bool = False) -> None:
        self.start_epoch = start_epoch
        self.sampler = sampler
        self.count_syncs = count_syncs
        self.start: float | None = None
        self.seconds: float | None = None
        self.between = 0.0
        self.steps = 0
        self.busy: float | None = None
        self.syncs: int | None = None
        self._last_end: float | None = None
        self._catcher: Any = None
        self._records: list = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.start is None and trainer.current_epoch >= self.start_epoch:
            step_overhead.synchronize(pl_module.device)
            self.start = self._last_end = time.perf_counter()
            self.sampler.start()
            if self.count_syncs and pl_module.device.type == "cuda":
                self._catcher = warnings.catch_warnings(record=True)
                self._records = self._catcher.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif self.start is not None and self.seconds is None and self._last_end is not None:
            self.between += now - self._last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.start is None or self.seconds is not None:
            return
        self.steps += 1
        self._last_end = time.perf_counter()
        last = (
            trainer.current_epoch == trainer.max_epochs - 1 and batch_idx == trainer.num_training_batches - 1
        )
        if not last:
            return
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs = sum("synchroniz" in str(r.message) for r in self._records)
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        step_overhead.synchronize(pl_module.device)
        self.seconds = time.perf_counter() - self.start
        self.busy = self.sampler.stop()


def variants(args: argparse.Namespace) -> list[tuple[str, bool, bool]]:
    """(precision, channels_last, compile) of each configuration to measure, the default first."""
    precisions = list(args.precisions)
    if args.device == "cpu":
        precisions = ["32"]  # mixed precision needs the GPU; the CPU run only tests this script
    compile_options = [False] if args.no_compile or args.device == "cpu" else [False, True]
    layouts = [False] if args.no_channels_last else [False, True]
    grid = [(p, c, k) for p in precisions for k in compile_options for c in layouts]
    if DEFAULT in grid:
        grid.remove(DEFAULT)
        grid.insert(0, DEFAULT)
    return grid


def label(variant: tuple[str, bool, bool]) -> str:
    """``16-mixed``, ``16-mixed + channels_last + compile``..."""
    precision, channels_last, compiled = variant
    return " + ".join(
        [precision] + (["channels_last"] if channels_last else []) + (["compile"] if compiled else [])
    )


def switches(cfg: Any, channels_last: bool, compiled: bool) -> list[str]:
    """The overrides of the memory/speed switches, wherever this version of the config keeps them."""
    group = "compute" if cfg.get("compute") is not None else "model"
    return [f"{group}.channels_last={str(channels_last).lower()}", f"{group}.compile={str(compiled).lower()}"]


def measure_seglight(
    base: list[str],
    variant: tuple[str, bool, bool],
    run_dir: Path,
    datamodule: Any,
    device: torch.device,
    syncs: bool,
) -> dict[str, Any]:
    """One configuration through seglight's Trainer; the data module (and its cache) is shared across them."""
    precision, channels_last, compiled = variant
    probe = compose(base, output_dir=run_dir)
    cfg = compose(
        [*base, f"trainer.precision={precision}", *switches(probe, channels_last, compiled)],
        output_dir=run_dir,
    )
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)
    clock = WindowClock(1, BusySampler(device), count_syncs=syncs)
    trainer.callbacks.append(clock)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        trainer.fit(module, datamodule=datamodule)
    assert clock.seconds is not None, "the window clock did not run (too few epochs?)"
    return {
        "variant": label(variant),
        "steps_per_s": clock.steps / clock.seconds,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "busy": clock.busy,
        "between_steps_share": clock.between / clock.seconds,
        "syncs_per_step": clock.syncs / clock.steps if clock.syncs is not None else None,
        "cache_on_gpu": bool(getattr(datamodule, "on_gpu", False)),
        "timed_steps": clock.steps,
    }


def measure_lab(datamodule: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The lab's loop on the same training cases and device: epochs 1.. timed."""
    sampler = BusySampler(device)

    def after_epoch(epoch: int, seconds: float, dice: float) -> bool:
        if epoch == 0:
            step_overhead.synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sampler.start()
        return False

    amp = device.type == "cuda"
    history = train_lab(
        datamodule.train_cases,
        [],
        args.size,
        max_epochs=args.epochs,
        lr=1e-4,
        batch_size=args.batch_size,
        workers=args.lab_workers,
        device=device,
        amp=amp,
        on_epoch=after_epoch,
        validate=False,
    )
    busy = sampler.stop()
    timed = history[1:]
    train_seconds = sum(h["train_seconds"] for h in timed)
    return {
        "variant": "lab loop, 16-mixed" if amp else "lab loop, 32",
        "steps_per_s": sum(h["steps"] for h in timed) / train_seconds,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "busy": busy,
        "between_steps_share": sum(h["waiting_seconds"] for h in timed) / train_seconds,
        "timed_steps": sum(h["steps"] for h in timed),
    }


def measure_all(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    """Every configuration, the lab's loop and the raw-loop overhead: the table's rows and the details."""
    warnings.filterwarnings("ignore")
    logging.getLogger("seglight").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seglight-bench-gpu-") as tmp:
        shape = ",".join(map(str, args.scan_shape))
        base = [
            "experiment=demo",
            f"data.demo.cache_dir={tmp}/demo",
            f"data.demo.num_cases={args.cases}",
            f"data.demo.shape=[{shape}]",
            f"data.spatial_size=[{','.join(map(str, args.size))}]",
            f"data.batch_size={args.batch_size}",
            "data.cache=auto",
            f"trainer.max_epochs={args.epochs}",
            f"trainer.accelerator={accelerator}",
            "+trainer.limit_val_batches=0",
            "+trainer.num_sanity_val_steps=0",
        ]
        if args.tiny:
            base.append("model.init_filters=8")
        started = time.perf_counter()
        from hydra.utils import instantiate

        datamodule = instantiate(compose(base, output_dir=Path(tmp) / "probe").data, _convert_="all")
        datamodule.prepare_data()
        print(
            f"Demo data: {args.cases} scans of {'x'.join(map(str, args.scan_shape))} in {time.perf_counter() - started:.0f} s"
        )
        for number, variant in enumerate(variants(args)):
            result = measure_seglight(
                base, variant, Path(tmp) / f"run{number}", datamodule, device, syncs=number == 0
            )
            print(f"  seglight {result['variant']}: {result['steps_per_s']:.2f} steps/s", flush=True)
            results.append(result)
        lab = measure_lab(datamodule, args, device)
        print(f"  {lab['variant']}: {lab['steps_per_s']:.2f} steps/s", flush=True)
    overhead_rows, overhead = [], {}
    if args.overhead_steps > 0:
        # The demo's own scans (24 of 96x96x48: 10 steps an epoch at batch 2) at this benchmark's size and batch.
        overhead_rows, overhead = step_overhead.run(
            overrides=[
                f"data.spatial_size=[{','.join(map(str, args.size))}]",
                f"data.batch_size={args.batch_size}",
                f"model.init_filters={8 if args.tiny else 16}",
            ],
            epochs=max(1, round(args.overhead_steps / 10)),
            repeats=1 if args.tiny else 3,
            precision="16-mixed" if device.type == "cuda" else "32",
            device=str(device),
        )
    rows = table_rows(results, lab, overhead_rows)
    setting = (
        f"SegResNet, {'x'.join(map(str, args.scan_shape))} scans -> {'x'.join(map(str, args.size))}, "
        f"batch {args.batch_size}, {args.cases} cases, epochs 2..{args.epochs} timed, on {device}"
    )
    return rows, {"setting": setting, "seglight": results, "lab": lab, "step_overhead": overhead}


def table_rows(results: list[dict[str, Any]], lab: dict[str, Any], overhead_rows: list[Row]) -> list[Row]:
    """Steps/s of each configuration against the lab's loop, then the default configuration's other figures."""
    rows = [
        Row(
            f"steps/s, {result['variant']}",
            "steps/s",
            result["steps_per_s"],
            lab["steps_per_s"],
            goal=">= 1.5x" if number == 0 else "",
            goal_ratio=1.5 if number == 0 else None,
            notes=f"against {lab['variant']}" if number == 0 else "",
        )
        for number, result in enumerate(results)
    ]
    default = results[0]
    name = default["variant"]
    rows += [
        Row(f"GPU busy, {name}", "share", default["busy"], lab["busy"], goal=">= 0.95", goal_min=0.95),
        Row(
            f"peak GPU memory, {name}",
            "GB",
            default["peak_gb"],
            lab["peak_gb"],
            lower_is_better=True,
            goal="<= 4 GB",
            goal_max=4.0,
        ),
        Row(
            f"time between steps, {name}",
            "share",
            default["between_steps_share"],
            lab["between_steps_share"],
            lower_is_better=True,
            notes="host time fetching the next batch (and the loop), as a share of the timed window",
        ),
        Row(f"host syncs per step, {name}", "syncs", default["syncs_per_step"], None),
    ]
    return rows + overhead_rows
