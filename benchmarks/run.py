"""``make bench``: every side-by-side benchmark in one run, printed as one table and written to
``benchmarks/results/<machine>.json``.

Rows: loader samples/s against the lab's Dataset + DataLoader (epoch 2 alone, and the median from epoch 2 on); step
time against a raw PyTorch loop on the same batches, through the path users run (the data module's loader, the
default callbacks and loggers) and through the bare Trainer on ready-made batches; wall time to the first validation Dice >= 0.85 of ``experiment=demo`` against the
lab's plain loop; prediction volumes/s against a bare sliding-window loop; and, where CUDA is available, the GPU
benchmark (``gpu.py``). ``--smoke`` runs all of it at toy sizes in about a minute (the test suite does, to check
that the scripts work; without CUDA it runs the GPU benchmark's code on the CPU); its figures say nothing about
speed.

    python benchmarks/run.py                   # the real measurements (several minutes on a CPU)
    python benchmarks/run.py --repeats 5 --only loader step
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import torch
from results import Row, format_table, machine_description, machine_name, write_results

BENCHMARKS = ("loader", "step", "dice", "predict", "gpu")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks, print the table, write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes: checks the scripts, measures nothing"
    )
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side repeats of each benchmark")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--results-dir", default=None, help="where <machine>.json goes (default: results/)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    repeats = 1 if args.smoke else args.repeats
    description = machine_description()
    print(
        f"Machine: {machine_name(description)} ({description['cpu']}, {description['cores']} cores, GPU {description['gpu']})"
    )
    rows: list[Row] = []
    for name in args.only:
        started = time.perf_counter()
        section, section_rows, details = run_one(name, args.smoke, repeats)
        if section is None:
            continue
        write_results(section, section_rows, details, args.results_dir)
        rows += section_rows
        print(f"  {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print(
        format_table(
            rows,
            title="\nseglight against the reference, side by side"
            + (" (smoke: toy sizes)" if args.smoke else ""),
        )
    )
    print(f"Figures: {(args.results_dir or 'benchmarks/results')}/{machine_name(description)}.json")
    return 0


def run_one(name: str, smoke: bool, repeats: int) -> tuple[str | None, list[Row], dict[str, Any]]:
    """One benchmark at full or toy size: (its section in the JSON file, rows, details)."""
    tiny_demo = [
        "data.demo.num_cases=6",
        "data.demo.shape=[24,24,16]",
        "data.spatial_size=[16,16,16]",
        "model.init_filters=8",
    ]
    if name == "loader":
        import loader_throughput

        options = dict(cases=6, shape=(24, 24, 16), size=(32, 32, 16), epochs=2, workers=1) if smoke else {}
        return "loader", *loader_throughput.run(repeats=repeats, **options)
    if name == "step":
        import step_overhead

        options = dict(overrides=tiny_demo, epochs=1) if smoke else {}
        return "step_overhead", *step_overhead.run(repeats=repeats, **options)
    if name == "dice":
        import time_to_dice

        if smoke:
            # Target 0: the first validation reaches it, so both clocks run end to end in one epoch.
            return "time_to_dice", *time_to_dice.run(
                0.0, 1, [*tiny_demo, "trainer.max_epochs=1", "data.num_workers=0"]
            )
        return "time_to_dice", *time_to_dice.run(repeats=repeats)
    if name == "predict":
        import prediction

        if smoke:
            return "prediction", *prediction.run(volumes=2, repeats=1, overrides=tiny_demo)
        return "prediction", *prediction.run(repeats=repeats)
    if name == "gpu":
        import gpu
        from gpu_measure import measure_all

        if torch.cuda.is_available():
            return "gpu", *measure_all(gpu.parse_args(["--tiny"] if smoke else []))
        if not smoke:
            print("  gpu: skipped: no CUDA GPU here; GPU figures stay open")
            return None, [], {}
        # Without CUDA the smoke run still exercises the GPU benchmark's code, on the CPU.
        rows, details = measure_all(gpu.parse_args(["--tiny", "--device", "cpu"]))
        for row in rows:
            row.benchmark = f"[gpu.py on the CPU] {row.benchmark}"
        return "gpu_code_on_cpu", rows, details
    raise ValueError(name)


if __name__ == "__main__":
    raise SystemExit(main())
