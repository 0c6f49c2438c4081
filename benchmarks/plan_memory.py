"""Calibrate the planner's memory estimate on a CUDA GPU: for a grid of networks, input sizes, batches and
precisions, the peak memory measured by real training steps and a sliding-window validation
(``seglight.planning.memory.Meter``) against the uncalibrated estimate (``Estimator`` with calibration 1.0).

Prints measured / estimated per case and the value ``ESTIMATE_CALIBRATION`` (seglight/planning/memory.py) should
have: the largest ratio, rounded up to 0.05. Without CUDA it says so in one line.

    python benchmarks/plan_memory.py
    python benchmarks/plan_memory.py --models segresnet dynunet unet swinunetr --precisions 16-mixed bf16-mixed 32
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

GRID_SIZES = ([64, 64, 64], [96, 96, 64], [128, 128, 96])
GRID_BATCHES = (2, 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=["segresnet", "dynunet", "unet"])
    parser.add_argument("--precisions", nargs="*", default=["16-mixed", "32"])
    parser.add_argument(
        "--volume", nargs=3, type=int, default=[192, 192, 128], help="validation volume (x y z)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"benchmarks/plan_memory.py: skipped: no CUDA GPU here (torch {torch.__version__}); calibration open"
        )
        return 0
    from seglight import compose
    from seglight.config.plans import module_factory
    from seglight.planning.memory import ESTIMATE_CALIBRATION, Estimator, Meter, gib
    from seglight.planning.steps import Precision

    spacing = [1.0, 1.0, 1.0]
    ratios = []
    with tempfile.TemporaryDirectory(prefix="seglight-plan-memory-") as folder:
        print(
            f"{'model':10} {'precision':10} {'size':16} {'batch':>5} {'measured':>10} {'estimated':>10} {'ratio':>6}"
        )
        for model in args.models:
            cfg = compose([f"model={model}", "data.demo.num_cases=2"], output_dir=folder)
            build = module_factory(cfg)

            def factory(mode, size, spacing, build=build):
                return build(mode, size, spacing, {})

            for name in args.precisions:
                precision = Precision.of(name)
                meter = Meter(
                    factory, "patch", precision, args.volume, spacing, Path(folder) / "measured.json"
                )
                estimator = Estimator(factory, "patch", precision, args.volume, spacing, calibration=1.0)
                for size in GRID_SIZES:
                    for batch in GRID_BATCHES:
                        measured = meter(size, batch).peak_bytes
                        estimated = estimator(size, batch).peak_bytes
                        ratio = measured / estimated if math.isfinite(measured) else math.nan
                        if math.isfinite(ratio):
                            ratios.append(ratio)
                        print(
                            f"{model:10} {name:10} {'x'.join(map(str, size)):16} {batch:5d} {gib(measured):>10} "
                            f"{gib(estimated):>10} {ratio:6.2f}"
                        )
    if ratios:
        suggested = math.ceil(max(ratios) * 20) / 20
        print(f"measured / estimated: {min(ratios):.2f}..{max(ratios):.2f} over {len(ratios)} cases")
        print(
            f"ESTIMATE_CALIBRATION is {ESTIMATE_CALIBRATION}; set it to {suggested} ({torch.cuda.get_device_name()})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
