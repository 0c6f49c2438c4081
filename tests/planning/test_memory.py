"""The memory estimate (real CPU forward/backward passes of the configured module), the GPU measurement's cache,
the budget, and the GPU measurement itself where CUDA is available."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seglight import compose
from seglight.config.plans import module_factory
from seglight.planning.memory import (
    ESTIMATE_CALIBRATION,
    GIB,
    Budget,
    Estimator,
    MeasurementCache,
    Meter,
    measure_profile,
    reference_size,
)
from seglight.planning.settings import PlanSettings, plan_target
from seglight.planning.steps import Precision

SPACING = [1.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("memory")
    cfg = compose(
        ["data.demo.num_cases=2", "data.demo.shape=[16,16,8]", "model.init_filters=8"], output_dir=run
    )
    build = module_factory(cfg)
    return lambda mode, size, spacing: build(mode, size, spacing, {})


def test_saved_activations_scale_with_the_voxels_as_the_estimate_assumes(factory) -> None:
    module = factory("patch", [32, 32, 16], SPACING)
    small = measure_profile(module, [16, 16, 16])
    large = measure_profile(factory("patch", [32, 32, 16], SPACING), [32, 32, 16])
    assert small.saved_bytes_per_voxel == pytest.approx(large.saved_bytes_per_voxel, rel=0.01)
    assert small.largest_output_per_voxel == pytest.approx(large.largest_output_per_voxel, rel=0.01)
    # Adam keeps two moments per parameter (and a step counter per tensor).
    assert small.optimizer_bytes == pytest.approx(2 * small.parameter_bytes, rel=0.01)
    assert (small.in_channels, small.out_channels) == (1, 1)


def test_the_estimate_grows_with_size_and_batch_and_shrinks_with_16_bit(factory) -> None:
    full = Estimator(factory, "patch", Precision.of("32"), [48, 48, 24], SPACING)
    mixed = Estimator(
        factory, "patch", Precision.of("16-mixed"), [48, 48, 24], SPACING, profiles=full.profiles
    )
    base = full([16, 16, 16], 2)
    assert (
        full([32, 32, 16], 2).train_bytes > base.train_bytes
        and full([16, 16, 16], 4).train_bytes > base.train_bytes
    )
    # 16-bit activations, but a 16-bit copy of the weights too: it pays off once activations dominate.
    assert mixed([64, 64, 32], 2).train_bytes < full([64, 64, 32], 2).train_bytes
    assert len(full.profiles) == 1  # one network configuration: measured once, for both estimators
    # Twice the batch: twice the activations and inputs, the same parameters and optimiser state.
    profile = next(iter(full.profiles.values()))
    static = 2 * profile.parameter_bytes + profile.optimizer_bytes
    activations = full([16, 16, 16], 4).train_bytes / ESTIMATE_CALIBRATION - static
    assert activations == pytest.approx(2 * (base.train_bytes / ESTIMATE_CALIBRATION - static), rel=1e-6)


def test_reference_sizes_keep_the_networks_layout() -> None:
    segresnet = {"_target_": "monai.networks.nets.SegResNet"}
    assert reference_size(segresnet, [96, 96, 48]) == [16, 16, 16]  # two voxels at the deepest level (1/8)
    assert reference_size({"_target_": "x.UNet", "strides": [2, 2, 2, 2]}, [96, 96, 16]) == [32, 32, 16]
    assert reference_size({"_target_": "x.UNETR"}, [96, 96, 96]) == [
        96,
        96,
        96,
    ]  # fixed input, quadratic attention


def test_the_budget_keeps_the_margin_and_the_gpu_cache_free() -> None:
    budget = Budget(24 * GIB, "plan.gpu_memory_gb=24", 0.15, 2 * GIB, "training cache on the GPU")
    assert budget.usable_bytes == pytest.approx(24 * GIB * 0.85 - 2 * GIB)
    assert budget.describe() == (
        "24.00 GiB (plan.gpu_memory_gb=24) - 15% margin - 2.00 GiB training cache on the GPU = 18.40 GiB usable"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the plan measures there")
def test_without_cuda_a_named_gpu_is_estimated_and_otherwise_the_cpu_is_planned(tmp_path: Path) -> None:
    gpu = plan_target(PlanSettings(gpu_memory_gb=24), True, "16-mixed", tmp_path)
    assert (gpu.gpu, gpu.measured, gpu.precision.name, gpu.budget.total_bytes) == (
        True,
        False,
        "16-mixed",
        24 * GIB,
    )
    assert gpu.timing_device.type == "cpu" and gpu.timing_precision.name == "32"
    cpu = plan_target(PlanSettings(), True, "16-mixed", tmp_path)
    assert (cpu.gpu, cpu.measured, cpu.precision.name) == (
        False,
        False,
        "32",
    ) and "free RAM" in cpu.budget.source


def test_measurements_are_kept_in_one_json_file(tmp_path: Path) -> None:
    path = tmp_path / "planning" / "gpu_memory.json"
    cache = MeasurementCache(path)
    cache.put("a", {"train_bytes": 1.0, "validation_bytes": 2.0})
    MeasurementCache(path).put("b", {"train_bytes": 3.0, "validation_bytes": math.inf})  # another process
    assert cache.get("a")["validation_bytes"] == 2.0 and cache.get("b")["validation_bytes"] == math.inf
    assert sorted(json.loads(path.read_text())) == ["a", "b"] and cache.get("c") is None
    assert sorted(p.name for p in path.parent.iterdir()) == [".gpu_memory.json.lock", "gpu_memory.json"]


def test_precisions_as_lightning_names_them() -> None:
    assert Precision.of("16-mixed").autocast == torch.float16 and Precision.of("16-mixed").scaler
    assert Precision.of("bf16-mixed").autocast == torch.bfloat16 and not Precision.of("bf16-mixed").scaler
    assert Precision.of(32).autocast is None and Precision.of("32-true").activation_bytes == 1.0
    assert Precision.of("bf16-true").parameters == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_measurement_is_cached_and_the_calibrated_estimate_bounds_it(
    factory, tmp_path: Path
) -> None:
    precision = Precision.of("16-mixed")
    meter = Meter(factory, "patch", precision, [64, 64, 32], SPACING, tmp_path / "gpu_memory.json")
    measured = meter([32, 32, 32], 2)
    assert 0 < measured.train_bytes < math.inf and 0 < measured.validation_bytes < math.inf
    again = Meter(factory, "patch", precision, [64, 64, 32], SPACING, tmp_path / "gpu_memory.json")(
        [32, 32, 32], 2
    )
    assert again == measured and len(json.loads((tmp_path / "gpu_memory.json").read_text())) == 1
    estimated = Estimator(factory, "patch", precision, [64, 64, 32], SPACING)([32, 32, 32], 2)
    assert measured.peak_bytes <= estimated.peak_bytes, (
        measured,
        estimated,
    )  # ESTIMATE_CALIBRATION is enough
