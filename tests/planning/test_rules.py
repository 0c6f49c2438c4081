"""The planning rules on small synthetic datasets built for each (real NIfTI files, the real data module and
module factory, steps timed on the CPU), and the pure rules against numbers computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from seglight import SegDataModule, compose
from seglight.core.errors import ConfigError
from seglight.models.networks import check_input_size, dynunet_kernels_strides, resolve_network_config
from seglight.planning import preprocessing, rules, schedule
from seglight.planning.fingerprint import fingerprint_dataset
from tests.helpers import make_planning_dataset, plan_for

ISOTROPIC = [((32, 32, 32), (1.0, 1.0, 1.0))] * 4
ANISOTROPIC = [((40, 40, 12), (1.0, 1.0, z)) for z in (3.0, 3.5, 4.0, 5.0)]  # z > 3x coarser, with few slices
MIXED = [((24, 24, 24), (1.0, 1.0, z)) for z in (1.0, 1.0, 3.0, 3.0)]


def planned(tmp_path_factory: pytest.TempPathFactory, name: str, cases, *overrides: str, **dataset):
    folder = tmp_path_factory.mktemp(name)
    return plan_for(make_planning_dataset(folder / "data", cases, **dataset), folder / "run", *overrides)


@pytest.fixture(scope="module")
def isotropic(tmp_path_factory):
    return planned(tmp_path_factory, "isotropic", ISOTROPIC)


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
    return planned(tmp_path_factory, "anisotropic", ANISOTROPIC, "model=dynunet", "model.filters=[8,16,32]")


def test_small_alike_isotropic_volumes_are_resized_whole(isotropic) -> None:
    fingerprint, plan = isotropic
    overrides = plan.overrides()
    assert plan.decision("target spacing").value == [1.0, 1.0, 1.0]
    assert overrides["data.mode"] == "resize" and overrides["data.spatial_size"] == [32, 32, 32]
    check_input_size({"_target_": "monai.networks.nets.SegResNet"}, [32, 32, 32], "data.spatial_size")
    # 5 % of 4 x 32^3 voxels is 0.2 volumes: the batch is the minimum, 2.
    assert overrides["data.batch_size"] == 2 and "patch sampling" not in [d.name for d in plan.decisions]
    chosen = plan.memory["chosen"]
    assert chosen["train_bytes"] <= plan.memory["usable_bytes"] and plan.memory["method"] == "estimated"
    # CT: the foreground's own 0.5/99.5 percentiles, mean and std (the object is 150 +- 10 HU).
    fg = fingerprint.channels[0].foreground
    assert overrides["data.normalize"] == "ct"
    assert overrides["data.intensity.low"] == [pytest.approx(fg["p0.5"])]
    assert overrides["data.intensity.high"] == [pytest.approx(fg["p99.5"])]
    assert overrides["data.intensity.mean"] == [pytest.approx(fg["mean"])] and 140 < fg["mean"] < 160
    assert overrides["data.intensity.std"] == [pytest.approx(fg["std"])] and 8 < fg["std"] < 12
    assert all(
        r.startswith("the time budget allows only") for r in plan.risks
    )  # the CPU's speed decides that


def test_a_time_budget_becomes_epochs_that_fit_in_it(tmp_path_factory) -> None:
    _, plan = planned(tmp_path_factory, "budgeted", ISOTROPIC, "plan.time_budget=60s")
    overrides = plan.overrides()
    epochs, interval = overrides["trainer.max_epochs"], overrides["trainer.check_val_every_n_epoch"]
    assert epochs >= interval >= 1 and epochs % interval == 0  # the last epoch validates
    # 3 training cases in batches of 2: 2 steps an epoch; 1 validation case and 2 checkpoints a validation.
    timing = plan.timing
    epoch_s = 2 * timing["step_s"] + schedule.EPOCH_OVERHEAD_SECONDS
    val_s = timing["validation_s"] + 2 * timing["checkpoint_s"]
    assert schedule.STARTUP_SECONDS + epochs * epoch_s + epochs // interval * val_s <= 60
    # Too few epochs at 1 mm: every axis is coarsened alike, at most 2x; else the spacing stays the data's.
    spacing = plan.decision("target spacing")
    factor = spacing.value[0]
    assert spacing.value == [factor] * 3 and 1.0 <= factor <= schedule.MAX_COARSENING
    assert (factor > 1.0) == ("then, when plan.time_budget allows fewer than 20 epochs" in spacing.rule)


def test_coarsening_for_time() -> None:
    assert schedule.coarsening(20) == 1.0 and schedule.coarsening(100) == 1.0
    assert schedule.coarsening(5) == pytest.approx(4 ** (1 / 3))  # 4x fewer voxels for 4x the epochs
    assert schedule.coarsening(1) == 2.0  # at most 2x per axis


def test_an_anisotropic_axis_gets_its_10th_percentile_spacing_and_1_voxel_kernels(anisotropic) -> None:
    fingerprint, plan = anisotropic
    spacing = plan.decision("target spacing").value
    # z spacings 3, 3.5, 4, 5 mm: median 3.75 > 3 x 1 mm with 12 slices < 40 / 3: the 10th percentile, 3.15.
    assert spacing == pytest.approx([1.0, 1.0, 3.15]) and np.percentile([3.0, 3.5, 4.0, 5.0], 10) == 3.15
    overrides = plan.overrides()
    assert overrides["data.mode"] == "patch" and "anisotropic" in plan.decision("mode").numbers
    size = overrides["data.patch.size"]
    smallest = rules.shapes_at(fingerprint, spacing).min(axis=0)
    assert all(s <= n for s, n in zip(size, smallest, strict=True))  # seglight refuses patches over a volume
    kernels, strides = dynunet_kernels_strides(size, spacing)
    assert overrides["model.strides"] == strides and overrides["model.kernel_size"] == kernels
    assert strides[1] == [2, 2, 1] and kernels[0] == [3, 3, 1]  # z pools later, with a 1-voxel kernel first
    assert overrides["model.filters"] == [8, 16, 32, 64]  # three filters for four stages: doubled once more
    model = dict(compose(["model=dynunet"]).model) | {"strides": strides, "kernel_size": kernels}
    check_input_size(model, size, "data.patch.size")
    assert any("strong anisotropy" in r for r in plan.risks) and any(
        "mixed spacings along z" in r for r in plan.risks
    )


def test_mixed_spacings_take_patch_mode_and_are_warned_about(tmp_path_factory) -> None:
    fingerprint, plan = planned(tmp_path_factory, "mixed", MIXED)
    assert plan.decision("target spacing").value == [1.0, 1.0, 2.0]  # the median of 1, 1, 3, 3 mm
    assert plan.overrides()["data.mode"] == "patch" and "shapes vary" in plan.decision("mode").numbers
    size = plan.overrides()["data.patch.size"]
    assert all(s % 8 == 0 for s in size) and size[2] <= 12  # the 1 mm cases have 12 slices at 2 mm
    assert any(r.startswith("mixed spacings along z: 1 to 3 mm") for r in plan.risks)


def test_a_small_structure_gets_more_foreground_patches_and_a_warning(tmp_path_factory) -> None:
    _, plan = planned(
        tmp_path_factory, "small", ISOTROPIC, "plan.target_spacing=[1.0,1.0,1.0]", obj=(2, 2, 2)
    )
    spacing = plan.decision("target spacing")
    assert spacing.kept and spacing.value == [1.0, 1.0, 1.0] and "kept" in spacing.numbers
    assert plan.overrides()["data.mode"] == "patch"  # a deployment spacing is kept by resampling to it
    assert plan.overrides()["data.patch.pos_neg_ratio"] == [2.0, 1.0]  # 8 of 32768 voxels: 0.02 %
    assert any("fewer than 3 voxels along x, y, z" in r for r in plan.risks)


def test_mri_like_intensities_are_z_scored_inside_the_body(tmp_path_factory) -> None:
    fingerprint, plan = planned(tmp_path_factory, "mri", ISOTROPIC, modality="MRI", body=0.5)
    overrides = plan.overrides()
    # The body fills half of each axis: the non-zero region keeps 1/8 of a volume (< 75 %).
    assert overrides["data.normalize"] == "zscore_nonzero" and "data.intensity.mean" not in overrides
    # A modality the user names is kept, and the plan says when the intensities disagree.
    modalities, decision = rules.decide_modalities(fingerprint, ["CT"])
    assert modalities == ["CT"] and decision.kept and "the data says channel 0: MRI" in decision.numbers
    assert preprocessing.decide_normalization(fingerprint, modalities).overrides["data.normalize"] == "ct"
    with pytest.raises(ConfigError, match=r"plan.modality=\['CT', 'T2'\] names 2 channel\(s\)"):
        rules.decide_modalities(fingerprint, ["CT", "T2"])


def test_a_rare_class_gets_patch_centres_of_its_own(tmp_path: Path) -> None:
    root = make_planning_dataset(tmp_path, ISOTROPIC[:2], labels=2)
    fingerprint = fingerprint_dataset(SegDataModule(root=str(root), num_workers=1))
    decision = preprocessing.decide_sampling(fingerprint, [1.0, 1.0])
    assert (
        decision.overrides == {"data.patch.class_ratios": [1.0, 1.0, 1.0]}
        and "rare: speck" in decision.numbers
    )


def test_the_largest_patch_that_fits_the_budget_is_chosen(tmp_path_factory) -> None:
    cases = [((48, 48, 48), (1.0, 1.0, 1.0))] * 4
    _, plan = planned(tmp_path_factory, "budget", cases, "plan.gpu_memory_gb=0.05")
    usable = plan.memory["usable_bytes"]
    assert "plan.gpu_memory_gb=0.05" in plan.memory["budget"] and plan.memory["method"] == "estimated"
    assert "whole median volume ([48, 48, 48]) at batch 2 is over the budget" in plan.decision("mode").numbers
    size = plan.overrides()["data.patch.size"]
    assert all(s % 8 == 0 for s in size) and plan.memory["chosen"]["train_bytes"] <= usable
    larger = [
        t for t in plan.memory["tests"] if t["mode"] == "patch" and math.prod(t["size"]) > math.prod(size)
    ]
    assert larger and all(max(t["train_bytes"], t["validation_bytes"]) > usable for t in larger)


# -- the pure rules -----------------------------------------------------------------------------------------------


def test_size_and_batch_search_against_a_known_memory_law() -> None:
    candidates = [[64] * 3, [48] * 3, [32] * 3, [16] * 3]

    def fits(size, batch) -> bool:  # memory proportional to voxels x batch: 6 inputs of 32^3 fit
        return math.prod(size) * batch <= 6 * 32**3

    fit = rules.fit_size_and_batch(candidates, fits, dataset_voxels=100 * 64**3)
    # 48^3 x 2 is over 6 x 32^3; 32^3 fits 6; 5 % of the dataset is 40 inputs of 32^3.
    assert (fit.size, fit.batch, fit.largest_batch, fit.batch_cap, fit.fits) == ([32] * 3, 6, 6, 40, True)
    small = rules.fit_size_and_batch(candidates, fits, dataset_voxels=4 * 32**3)
    assert (small.size, small.batch, small.batch_cap) == ([32] * 3, 2, 0)  # never below 2
    none = rules.fit_size_and_batch(candidates, lambda size, batch: False, dataset_voxels=1e6)
    assert (none.size, none.fits) == ([16] * 3, False)
    assert (
        rules.split_batch(8, 4) == (2, 4)
        and rules.split_batch(6, 4) == (2, 3)
        and rules.split_batch(2, 4) == (2, 1)
    )


@pytest.mark.parametrize(("option", "divisor"), [("segresnet", 8), ("unet", 16), ("swinunetr", 32)])
def test_candidates_are_sizes_the_network_accepts(option: str, divisor: int) -> None:
    model = dict(compose([f"model={option}"]).model)
    sizes = rules.NetworkSizes(model, (1.0, 1.0, 2.0))
    candidates = rules.candidate_sizes([200, 150, 70], [180, 160, 64], sizes)
    assert candidates[0] == [s // divisor * divisor for s in (200, 150, 70)] and len(candidates) > 5
    for size in candidates:
        check_input_size(model, size, "data.patch.size")
        assert min(size) >= divisor and all(s % divisor == 0 for s in size)
    assert [math.prod(c) for c in candidates] == sorted((math.prod(c) for c in candidates), reverse=True)


def test_dynunet_candidates_keep_every_pooling_and_build() -> None:
    model = dict(compose(["model=dynunet"]).model)
    spacing = (0.8, 0.8, 2.5)
    candidates = rules.candidate_sizes([100, 100, 40], [100, 100, 40], rules.NetworkSizes(model, spacing))
    assert candidates[0] == [96, 96, 40] and min(min(c) for c in candidates) >= 8
    for size in candidates:
        resolved = resolve_network_config(
            model, 1, {0: "background", 1: "organ"}, size, "data.patch.size", spacing
        )
        check_input_size(resolved, size, "data.patch.size")


def test_schedule_for_a_time_budget_by_hand() -> None:
    decision = schedule.decide_schedule(
        budget_s=600, step_s=2.0, validation_s=3.0, train_cases=10, val_cases=4, batch_size=2,
        configured_epochs=100, overhead_s=20.0, device="the CPU", checkpoint_s=0.5,
    )  # fmt: skip
    # An epoch: 5 steps x 2 s + 0.1 s = 10.1 s. A validation: 4 x 3 s + 2 checkpoints x 0.5 s = 13 s, at most 20 %
    # of the time: every ceil(13 / (0.25 x 10.1)) = 6 epochs. (600 - 20) / (10.1 + 13 / 6) = 47.3 epochs -> 42,
    # a multiple of 6: 20 + 42 x 10.1 + 7 x 13 = 535 s in all.
    assert decision.overrides == {"trainer.max_epochs": 42, "trainer.check_val_every_n_epoch": 6}
    assert "about 535 s in all" in decision.numbers
    kept = schedule.decide_schedule(None, 2.0, 3.0, 10, 4, 2, 100, 20.0, "the CPU")
    # 100 x (10.1 + 12) s + 20 s = 2230 s
    assert kept.value == 100 and not kept.overrides and "about 37.2 min" in kept.numbers


@pytest.mark.parametrize(
    ("text", "seconds"), [("8m", 480), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("45", 45)]
)
def test_durations(text: str, seconds: float) -> None:
    assert schedule.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "8x", "5m and", "0m"])
def test_a_wrong_duration_is_one_message(text: str) -> None:
    with pytest.raises(ConfigError, match="plan.time_budget="):
        schedule.parse_duration(text)
