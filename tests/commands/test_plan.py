"""python -m seglight.plan end to end on the demo data, as a user runs it; its plan.yaml composed over train.yaml
and trained on; a wrong option is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seglight import compose
from seglight.planning.files import plan_overlay, read_plan
from tests.helpers import run_cli, run_script, train_in_process

pytestmark = pytest.mark.slow

TINY = [
    "data.demo.num_cases=6",
    "data.demo.shape=[24,24,16]",
    "data.num_workers=0",
    "model.init_filters=8",
    "plan.measure_steps=1",
]


def test_plan_prints_the_fingerprint_and_the_plan_and_writes_a_plan_that_trains(
    tmp_path: Path, cache_dir
) -> None:
    run = tmp_path / "plan"
    result = run_cli("seglight.plan", *TINY, "plan.time_budget=1m", f"hydra.run.dir={run}", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Fingerprint: 6 cases" in out and "spacing (mm)     0.8×0.8×2.5" in out
    assert "channel 0: CT (dataset.json)" in out and "label 1 organ:" in out
    for name in (
        "modality",
        "target spacing",
        "mode",
        "patch size",
        "batch",
        "network",
        "normalisation",
        "epochs",
    ):
        assert f"\n  {name}: " in out, name
    assert "Plan (memory estimated, precision 32" in out and "strong anisotropy: z is 3.1" in out
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
        "fingerprint.json",
        "plan.json",
        "plan.log",
        "plan.yaml",
    ]
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert fingerprint["num_cases"] == 6 and fingerprint["spacing_mm"]["median"] == [0.8, 0.8, 2.5]
    record = json.loads((run / "plan.json").read_text())
    assert record["overrides"]["data.mode"] == "patch" and record["memory"]["method"] == "estimated"
    plan = read_plan(run / "plan.yaml")
    epochs = plan["trainer"]["max_epochs"]
    size = plan["data"]["patch"]["size"]
    assert epochs >= 1 and plan["data"]["normalize"] == "ct"
    assert all(
        s % 8 == 0 and s <= n for s, n in zip(size, [24, 24, 16], strict=True)
    )  # SegResNet's multiples

    # The plan over train.yaml, as `plan=<file>` will compose it; the command line wins over it.
    overlay = plan_overlay(run / "plan.yaml", tmp_path / "conf")
    demo = TINY[:4]
    cfg = compose([*overlay, *demo, "trainer.max_epochs=1"], output_dir=tmp_path / "train")
    assert cfg.data.mode == "patch" and list(cfg.data.patch.size) == plan["data"]["patch"]["size"]
    assert list(cfg.data.intensity.mean) == plan["data"]["intensity"]["mean"] and cfg.trainer.max_epochs == 1
    # It trains today once the normalisation keys (read by the data module from the next version on) are left out.
    later = [
        "~data.normalize",
        "~data.intensity",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
    ]
    status = train_in_process([*overlay, *demo, *later], tmp_path / "train")
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert status == 0 and summary["status"] == "completed"
    assert (summary["epochs"], summary["validations"]) == (1, 1)


def test_a_wrong_plan_option_is_one_line(tmp_path: Path, cache_dir) -> None:
    result = run_script(
        "seglight-plan", "plan.time_budget=soon", f"hydra.run.dir={tmp_path / 'run'}", cache=cache_dir
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "seglight.plan: error: plan.time_budget='soon' is not a duration: give e.g. 8m, 2h, 1h30m or 90s"
    ]
