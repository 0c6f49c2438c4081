"""python -m seglight.plan end to end on the demo data, as a user runs it; its plan.yaml trained on as
``plan=<file>`` (the command line winning over it); ``plan=auto`` planning and training in one run, whose
checkpoint predicts a scan in the scan's own geometry; a wrong option is one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seglight.data.demo import demo_root
from seglight.planning.files import read_plan
from seglight.prediction.cases import predict
from seglight.training.checkpoints import safe_load
from tests.helpers import run_cli, run_script

pytestmark = pytest.mark.slow

TINY = [
    "data.demo.num_cases=6",
    "data.demo.shape=[24,24,16]",
    "data.num_workers=0",
    "model.init_filters=8",
    "plan.measure_steps=1",
]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


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
    size = plan["data"]["patch"]["size"]
    assert plan["trainer"]["max_epochs"] >= 1 and plan["data"]["normalize"] == "ct"
    assert all(
        s % 8 == 0 and s <= n for s, n in zip(size, [24, 24, 16], strict=True)
    )  # SegResNet's multiples

    # python -m seglight.train plan=<file>: the plan's values, and the command line's over them.
    train = tmp_path / "train"
    over = ["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "data.batch_size=1"]
    result = run_cli(
        "seglight.train", *TINY[:4], *QUIET, f"plan={run / 'plan.yaml'}", *over, f"hydra.run.dir={train}",
        cache=cache_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((train / "summary.json").read_text())
    assert summary["status"] == "completed" and (summary["epochs"], summary["validations"]) == (1, 1)
    assert read_plan(train / "plan.yaml") == plan and (train / "fingerprint.json").is_file()
    hparams = safe_load(next((train / "checkpoints").glob("*.ckpt")))["hyper_parameters"]
    assert hparams["plan"]["source"] == str((run / "plan.yaml").resolve())
    assert sorted(hparams["plan"]["skipped"]) == [
        "data.batch_size",
        "trainer.check_val_every_n_epoch",
        "trainer.max_epochs",
    ]
    assert hparams["data"]["normalize"] == "ct" and hparams["data"]["intensity"] == plan["data"]["intensity"]
    assert hparams["data"]["target_spacing"] == plan["data"]["patch"]["target_spacing"]


def test_plan_auto_plans_then_trains_and_its_checkpoint_predicts_in_the_scans_geometry(
    tmp_path: Path, cache_dir
) -> None:
    run = tmp_path / "auto"
    result = run_cli(
        "seglight.train", *TINY, *QUIET, "plan=auto", "trainer.max_epochs=1", "data.batch_size=1",
        f"hydra.run.dir={run}", cache=cache_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "Fingerprint: 6 cases" in log and "normalisation: ct" in log
    assert "The command line overrides the plan's data.batch_size" in log
    assert {"plan.yaml", "plan.json", "fingerprint.json", "summary.json"} <= {p.name for p in run.iterdir()}
    plan = read_plan(run / "plan.yaml")
    assert plan["plan"]["made"]["fingerprint"] == "fingerprint.json"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    hparams = safe_load(ckpt)["hyper_parameters"]
    assert hparams["plan"]["source"] == "auto" and hparams["plan"]["skipped"] == ["data.batch_size"]
    assert hparams["plan"]["applied"]["data.patch.size"] == plan["data"]["patch"]["size"]
    assert hparams["data"]["mode"] == "patch" and hparams["data"]["normalize"] == "ct"

    # A demo scan as it is stored (LPS, 0.8 x 0.8 x 2.5 mm), predicted with the planned preprocessing.
    scan = demo_root(cache_dir / "demo", num_cases=6, shape=(24, 24, 16)) / "imagesTr" / "demo_000.nii.gz"
    report = predict(ckpt, input=scan, output=tmp_path / "masks", device="cpu")
    assert not report.failed
    original, mask = nib.load(scan), nib.load(tmp_path / "masks" / "demo_000.nii.gz")
    assert mask.shape == original.shape and np.allclose(mask.affine, original.affine, atol=1e-6)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S") and mask.get_data_dtype() == np.uint8

    # A restart in the run folder trains with its plan.yaml instead of planning again.
    again = run_cli(
        "seglight.train", *TINY, *QUIET, "plan=auto", "trainer.max_epochs=2", "data.batch_size=1",
        f"hydra.run.dir={run}", "resume=true", cache=cache_dir,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Training with this run folder's plan" in (run / "train.log").read_text()
    assert read_plan(run / "plan.yaml") == plan


def test_a_wrong_plan_option_is_one_line(tmp_path: Path, cache_dir) -> None:
    result = run_script(
        "seglight-plan", "plan.time_budget=soon", f"hydra.run.dir={tmp_path / 'run'}", cache=cache_dir
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "seglight.plan: error: plan.time_budget='soon' is not a duration: give e.g. 8m, 2h, 1h30m or 90s"
    ]
    missing = run_script("seglight-train", f"plan={tmp_path / 'nowhere.yaml'}", cache=cache_dir)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"seglight.train: error: plan file {tmp_path / 'nowhere.yaml'}: not found (python -m seglight.plan writes "
        "plan.yaml into its run folder)"
    ]
