"""Plan files: written as Hydra configs of ordinary overrides, composed over train.yaml as a `plan` group option
(real Hydra composition), read back; the planner's options checked."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seglight import compose
from seglight.config.plans import keep_to_budget, with_plan
from seglight.core.errors import ConfigError
from seglight.planning.files import (
    PACKAGE_LINE,
    applied_overrides,
    is_plan_file,
    nested,
    plan_arguments,
    plan_overlay,
    plan_record,
    plan_yaml,
    read_plan,
)
from seglight.planning.planner import Plan
from seglight.planning.rules import Decision
from seglight.planning.settings import PlanSettings

MADE = {"date": "2026-01-01T00:00:00+00:00", "dataset": "/data/x", "memory": "estimated"}


def a_plan() -> Plan:
    decisions = [
        Decision("mode", "patch", "patch when ...", "anisotropic: 3.1x", {"data.mode": "patch"}),
        Decision(
            "patch size",
            [64, 64, 32],
            "start at 256^3 ...",
            "median shape x 96, y 96, z 48",
            {"data.patch.size": [64, 64, 32], "data.patch.target_spacing": [0.8, 0.8, 2.5]},
        ),
        Decision("batch", 4, "what fits ...", "5 % of the dataset", {"data.batch_size": 4}),
        Decision(
            "normalisation",
            "ct",
            "CT: clip ...",
            "foreground p0.5 -10",
            {"data.normalize": "ct", "data.intensity.low": [-10.0], "data.intensity.high": [200.0]},
        ),
        Decision("epochs", {"max_epochs": 30}, "fill ...", "2 s per step", {"trainer.max_epochs": 30}),
    ]
    settings = {"gpu_memory_gb": 24.0, "time_budget": "8m", "target_spacing": None, "modality": None}
    return Plan(decisions, ["strong anisotropy: z is 3.1x coarser"], {}, None, settings)


def test_nested_overrides() -> None:
    assert nested({"data.patch.size": [1], "data.mode": "patch", "seed": 3}) == {
        "data": {"patch": {"size": [1]}, "mode": "patch"},
        "seed": 3,
    }


def test_a_plan_file_explains_itself_and_reads_back(tmp_path: Path) -> None:
    text = plan_yaml(a_plan(), MADE)
    assert text.startswith(PACKAGE_LINE + "\n")
    assert "# patch size -> data.patch.size, data.patch.target_spacing: start at 256^3 ..." in text
    assert "# warning: strong anisotropy: z is 3.1x coarser" in text and "    size: [64, 64, 32]" in text
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    values = read_plan(path)
    assert values["data"]["patch"] == {"size": [64, 64, 32], "target_spacing": [0.8, 0.8, 2.5]}
    assert values["plan"]["time_budget"] == "8m" and values["plan"]["made"]["dataset"] == "/data/x"
    PlanSettings.from_config(values["plan"])  # a saved plan's options are the planner's options


def test_a_plan_composes_over_train_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "run" / "plan.yaml"
    path.parent.mkdir()
    path.write_text(plan_yaml(a_plan(), MADE))
    overlay = plan_overlay(path, tmp_path / "conf")
    assert overlay[0] == f"hydra.searchpath=[file://{(tmp_path / 'conf').resolve()}]"
    assert overlay[1].startswith("plan=file_") and (tmp_path / "conf" / "plan").is_dir()
    assert overlay[2] == f"+plan.source='{path.resolve()}'"
    cfg = compose([*overlay, "experiment=demo", "data.batch_size=3"], output_dir=tmp_path / "train")
    assert cfg.data.mode == "patch" and list(cfg.data.patch.size) == [64, 64, 32]
    assert cfg.data.patch.num_samples == 4  # what the plan does not set stays as configured
    assert cfg.data.batch_size == 3  # the command line over the plan
    assert cfg.trainer.max_epochs == 30  # the plan over the experiment (it was made for it)
    assert cfg.data.normalize == "ct" and list(cfg.data.intensity.low) == [-10.0]
    assert OmegaConf.to_container(cfg.plan)["made"] == MADE
    assert plan_overlay(path, tmp_path / "conf") == overlay  # the same file: the same option


def test_plan_file_on_the_command_line_round_trips_and_records_what_the_command_line_overrode(
    tmp_path: Path, cache_dir: Path
) -> None:
    path = tmp_path / "run" / "plan.yaml"
    path.parent.mkdir()
    path.write_text(plan_yaml(a_plan(), MADE))
    (path.parent / "plan.json").write_text("{}")
    arguments = ["experiment=demo", f"plan={path}", "data.batch_size=3", "plan.time_budget=9m"]
    composed = plan_arguments(arguments, tmp_path / "conf")
    assert composed[0] == "experiment=demo" and composed[-2:] == ["data.batch_size=3", "plan.time_budget=9m"]
    assert plan_arguments(["plan=auto", "plan=none", "plan.time_budget=8m"], tmp_path) == [
        "plan=auto",
        "plan=none",
        "plan.time_budget=8m",
    ]
    # seglight.compose takes plan=<file> as the command line does; the plan's values, the command line's over them.
    cfg = compose(arguments, output_dir=tmp_path / "train")
    assert cfg.data.mode == "patch" and cfg.data.batch_size == 3 and cfg.trainer.max_epochs == 30
    assert cfg.plan.source == str(path.resolve()) and cfg.plan.time_budget == "9m"
    cfg = with_plan(cfg)  # what training does before it builds anything
    assert cfg.plan.skipped == ["data.batch_size"] and cfg.data.batch_size == 3
    assert cfg.plan.applied["data.patch.size"] == [64, 64, 32] and "data.batch_size" not in cfg.plan.applied
    # The plan file and the plan.json beside it are copied into the run folder.
    assert read_plan(tmp_path / "train" / "plan.yaml") == read_plan(path)
    assert (tmp_path / "train" / "plan.json").read_text() == "{}"
    record = plan_record(OmegaConf.to_container(cfg.plan))
    assert record["source"] == str(path.resolve()) and record["made"] == MADE and "given" not in record
    assert plan_record({}) is None and plan_record({"time_budget": None}) is None


def test_applied_overrides_are_the_plan_files_leaves() -> None:
    values = {
        "data": {"patch": {"size": [1, 2, 3]}, "intensity": {"low": [0.0]}},
        "plan": {"x": 1},
        "seed": 2,
    }
    assert applied_overrides(values) == {"data.patch.size": [1, 2, 3], "data.intensity.low": [0.0], "seed": 2}


@pytest.mark.parametrize(
    ("value", "is_file"),
    [("auto", False), ("none", False), ("file_0123abcd", False), ("plan.yaml", True), ("runs/x/plan", True)],
)
def test_plan_values_that_name_files(value: str, is_file: bool) -> None:
    assert is_plan_file(value) is is_file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  mode: patch\n", "does not start with '# @package _global_'"),
        (PACKAGE_LINE + "\ndata:\n  mode: patch\n", "has no 'plan' section"),
        (PACKAGE_LINE + "\ndata: [unclosed\n", "not readable YAML"),
    ],
)
def test_a_file_that_is_not_a_plan_is_one_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_plan(path)
    with pytest.raises(ConfigError, match="not found"):
        read_plan(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpu_memory": 24}, "plan.gpu_memory: not a plan option"),
        ({"gpu_memory_gb": 0}, "plan.gpu_memory_gb must be a positive number of GiB"),
        ({"margin": 0.95}, "plan.margin must be at least 0 and below 0.9"),
        ({"time_budget": "soon"}, "plan.time_budget='soon' is not a duration"),
    ],
)
def test_wrong_plan_options_are_one_message(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PlanSettings.from_config(options)


def test_the_plan_command_config_composes_the_training_config(tmp_path: Path) -> None:
    cfg = compose(["data=msd", "data.root=x", "model=dynunet", "plan.gpu_memory_gb=24"], "plan", tmp_path)
    train = compose(["data=msd", "data.root=x", "model=dynunet"], "train", tmp_path)
    assert cfg.task_name == "plan" and cfg.plan.gpu_memory_gb == 24 and cfg.plan.margin == 0.15
    for key in ("data", "model", "loss", "optimizer", "trainer", "inference", "compute"):
        assert cfg[key] == train[key], key
    assert PlanSettings.from_config(cfg.plan) == PlanSettings(gpu_memory_gb=24.0)


def test_plan_auto_with_a_time_budget_keeps_the_run_to_it_unless_the_epochs_are_given(tmp_path: Path) -> None:
    started = time.monotonic() - 10.0  # the run started 10 s ago
    cfg = keep_to_budget(compose(["plan=auto", "plan.time_budget=1m"], output_dir=tmp_path), started)
    callback = cfg.callbacks.time_budget
    assert callback._target_ == "seglight.training.callbacks.time_budget.TimeBudget"
    assert callback.deadline == pytest.approx(time.time() + 50.0, abs=2.0)
    given = compose(["plan=auto", "plan.time_budget=1m", "trainer.max_epochs=5"], output_dir=tmp_path)
    assert "time_budget" not in keep_to_budget(given, started).callbacks
    assert "time_budget" not in keep_to_budget(compose(["plan=auto"], output_dir=tmp_path), started).callbacks
