"""plan=auto against today's defaults and against the tuned ``experiment=demo``: best Dice/val after the same
epochs with the same seed, side by side, and the time the planning itself took, on the CT demo and on the MR-like
demo (``data.demo.modality=mr``: no Hounsfield units, a gain and bias field per scan) or on a dataset of your own.
The planned run must not be worse than the hand-tuned one.

Every arm trains in this process as ``python -m seglight.train`` does, with ``trainer.max_epochs`` and ``seed`` on
its command line (they win over the plan's). ``plan=auto`` plans without a time budget: the same epochs as the
others; the planner chooses the mode, spacing, patch and batch, the network's settings and the normalisation.
``experiment=demo plan=auto`` is the plan over the tuned experiment (the plan does not choose the learning rate).

    python benchmarks/plan.py                                   # CT and MR demos, 20 epochs, seed 0
    python benchmarks/plan.py --epochs 50 --seeds 0 1 2 --results-dir benchmarks/results
    python benchmarks/plan.py --datasets mr --epochs 2 --data data.demo.num_cases=8   # a smoke run
    python benchmarks/plan.py --datasets own --data data=msd data.root=/data/Task04_Hippocampus
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from results import Row, format_table, median, spread, write_results

from seglight import compose

DATASETS = {"ct": [], "mr": ["data.demo.modality=mr"], "own": []}
ARMS = {
    "defaults": [],
    "experiment=demo": ["experiment=demo"],
    "plan=auto": ["plan=auto"],
    "experiment=demo plan=auto": ["experiment=demo", "plan=auto"],
}
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_arm(overrides: Sequence[str], epochs: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """One training run in this process, as ``python -m seglight.train`` runs it; its summary and plan times."""
    from seglight.train import train

    cfg = compose([*overrides, f"trainer.max_epochs={epochs}", f"seed={seed}", *QUIET], output_dir=run_dir)
    started = time.perf_counter()
    summary = train(cfg)
    record: dict[str, Any] = {"best_dice": summary.get("best_dice"), "wall_s": time.perf_counter() - started}
    plan_file = run_dir / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        fingerprint = json.loads((run_dir / "fingerprint.json").read_text())
        record["planning_s"] = plan["planning_seconds"] + fingerprint["read_seconds"]
        record["plan"] = plan["overrides"]
    return record


def rows_for(dataset: str, runs: dict[str, list[dict[str, Any]]], notes: str) -> list[Row]:
    """Best Dice of the planned arms against the defaults and the tuned experiment, and the planning time."""
    rows = []
    for planned, reference in (
        ("plan=auto", "defaults"),
        ("plan=auto", "experiment=demo"),
        ("experiment=demo plan=auto", "experiment=demo"),
    ):
        if planned not in runs or reference not in runs:
            continue
        ours = [r["best_dice"] for r in runs[planned]]
        theirs = [r["best_dice"] for r in runs[reference]]
        ratios = [p / r for p, r in zip(ours, theirs, strict=True) if p and r]
        tuned = reference == "experiment=demo"
        rows.append(
            Row(
                f"{dataset}: best Dice, {planned} vs {reference}",
                "Dice",
                median(ours),
                median(theirs),
                goal=">= 1x" if tuned else "",
                goal_ratio=1.0 if tuned else None,
                spread=spread(ratios) if len(ratios) > 1 else "",
                notes=notes,
            )
        )
    planning = [r.get("planning_s") for name, arm in runs.items() if "plan=auto" in name for r in arm]
    rows.append(
        Row(f"{dataset}: planning (fingerprint + plan)", "s", median(planning), None, lower_is_better=True)
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["ct", "mr"])
    parser.add_argument(
        "--data", nargs="*", default=[], help="more data overrides for every arm (own: the dataset)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every arm (experiment=demo's 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per arm and seed")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--results-dir", default=None, help="write the figures into <dir>/<machine>.json")
    args = parser.parse_args(argv)
    if "own" in args.datasets and not args.data:
        parser.error("--datasets own needs --data (e.g. data=msd data.root=/data/Task04_Hippocampus)")
    arms = {name: ARMS[name] for name in args.arms}
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="seglight-plan-bench-") as folder:
        for dataset in args.datasets:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
            for seed in args.seeds:
                for name, overrides in arms.items():
                    run_dir = Path(folder) / dataset / f"{name.replace('=', '_').replace(' ', '+')}-{seed}"
                    data = [*DATASETS[dataset], *args.data]
                    runs[name].append(run_arm([*overrides, *data], args.epochs, seed, run_dir))
            data = " ".join([*DATASETS[dataset], *args.data]) or "the CT demo"
            rows += rows_for(dataset, runs, f"{args.epochs} epochs, seeds {args.seeds}, {data}")
            details[dataset] = runs
    print(format_table(rows, "plan=auto against the defaults and the tuned experiment"))
    if args.results_dir:
        write_results("plan", rows, {"runs": details}, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
