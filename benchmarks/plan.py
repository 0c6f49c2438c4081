"""plan=auto against today's defaults and against the tuned ``experiment=demo``: best Dice/val after the same
epochs with the same seed, side by side, and the time the planning itself took. The planned run must not be
worse than the hand-tuned one.

Written against the interface training gets in the next step, and runs only once it is there: ``python -m
seglight.train ... plan=auto`` (train.yaml's ``plan`` group: plan, then train, saving ``plan.json`` and
``fingerprint.json`` in the run folder), a data module that reads ``data.normalize`` / ``data.intensity``, and
``trainer.max_epochs`` on the command line winning over the plan's. Until then it says so in one line.

    python benchmarks/plan.py                                  # the demo data (synthetic CT)
    python benchmarks/plan.py --data data=msd data.root=/data/Task04_Hippocampus --epochs 50   # another modality
    python benchmarks/plan.py --repeats 3 --results-dir benchmarks/results
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

ARMS = {
    "defaults": [],
    "experiment=demo": ["experiment=demo"],
    "plan=auto": ["plan=auto"],
}
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def phase_two_ready() -> str | None:
    """None when training takes ``plan=auto``; else what is missing, in one line."""
    try:
        cfg = compose(["plan=auto"])
    except Exception as exc:  # Hydra's composition errors: no `plan` group in train.yaml yet
        return f"train.yaml has no plan group yet ({type(exc).__name__})"
    try:
        from seglight.data.datamodule import SegDataModule

        SegDataModule(demo={"cache_dir": tempfile.gettempdir()}, normalize="zscore")
    except TypeError:
        return "the data module does not read data.normalize yet"
    return None if "plan" in cfg else "train.yaml composes no plan options"


def run_arm(overrides: Sequence[str], epochs: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """One training run in this process, as ``python -m seglight.train`` runs it; its summary and plan times."""
    from seglight.train import train

    cfg = compose([*overrides, f"trainer.max_epochs={epochs}", f"seed={seed}", *QUIET], output_dir=run_dir)
    started = time.perf_counter()
    summary = train(cfg)
    record = {"best_dice": summary.get("best_dice"), "wall_s": time.perf_counter() - started}
    plan_file = run_dir / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        fingerprint = json.loads((run_dir / "fingerprint.json").read_text())
        record["planning_s"] = plan["planning_seconds"] + fingerprint["read_seconds"]
        record["plan"] = plan["overrides"]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="*", default=[], help="data overrides (default: the demo data)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every arm (experiment=demo's 20)")
    parser.add_argument("--repeats", type=int, default=1, help="seeds per arm")
    parser.add_argument("--results-dir", default=None, help="write the figures into <dir>/<machine>.json")
    args = parser.parse_args(argv)
    missing = phase_two_ready()
    if missing:
        print(f"benchmarks/plan.py: skipped: training does not take plan=auto yet: {missing}")
        return 0
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory(prefix="seglight-plan-bench-") as folder:
        for seed in range(args.repeats):
            for name, overrides in ARMS.items():
                run_dir = Path(folder) / f"{name.replace('=', '_')}-{seed}"
                runs[name].append(run_arm([*args.data, *overrides], args.epochs, seed, run_dir))
    planned = [r["best_dice"] for r in runs["plan=auto"]]
    rows = []
    for name in ("defaults", "experiment=demo"):
        reference = [r["best_dice"] for r in runs[name]]
        ratios = [p / r for p, r in zip(planned, reference, strict=True) if p and r]
        rows.append(
            Row(
                f"best Dice, plan=auto vs {name}",
                "Dice",
                median(planned),
                median(reference),
                goal=">= 1x" if name == "experiment=demo" else "",
                goal_ratio=1.0 if name == "experiment=demo" else None,
                spread=spread(ratios) if ratios else "",
                notes=f"{args.epochs} epochs, seeds 0..{args.repeats - 1}, {' '.join(args.data) or 'demo data'}",
            )
        )
    planning = [r.get("planning_s") for r in runs["plan=auto"]]
    rows.append(Row("planning time (fingerprint + plan)", "s", median(planning), None, lower_is_better=True))
    print(format_table(rows, "plan=auto against the defaults and the tuned experiment"))
    if args.results_dir:
        write_results("plan", rows, {"runs": runs}, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
