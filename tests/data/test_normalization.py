"""The intensity normalisation transforms (data.normalize), against values computed by hand; in the data module's
settings and pipeline (today's window keeps its disk-cache key); what a MONAI bundle can rebuild."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from seglight.core.errors import ConfigError
from seglight.data.caching.build import pipeline
from seglight.data.caching.datasets import pipeline_signature
from seglight.data.datamodule import SegDataModule
from seglight.data.normalization import (
    NORMALIZE_MODES,
    SEGLIGHT_ONLY,
    ClipIntensityd,
    PerChannelNormalized,
    normalization_transforms,
    value_range,
)
from seglight.data.settings import DataSettings, NormalizationSettings
from seglight.data.transforms import CompactLabeld, LoadCased


def run(steps, image: torch.Tensor) -> torch.Tensor:
    data = {"image": image}
    for step in steps:
        data = step(data)
    return data["image"]


def test_ct_clips_to_the_given_range_then_subtracts_the_mean_and_divides_by_the_std() -> None:
    image = torch.tensor([[[[-1000.0, 0.0], [100.0, 250.0]]]])  # (1, 1, 2, 2): one channel
    steps = normalization_transforms(
        "image", "ct", {"low": [-50.0], "high": [200.0], "mean": [50.0], "std": [25.0]}, channels=1
    )
    out = run(steps, image)
    # clipped: -50, 0, 100, 200 -> (v - 50) / 25
    assert out.flatten().tolist() == pytest.approx([-4.0, -2.0, 2.0, 6.0])


def test_zscore_per_image_and_per_channel() -> None:
    image = torch.tensor([[[[1.0, 3.0]]], [[[10.0, 30.0]]]])  # two channels of two voxels
    out = run(normalization_transforms("image", "zscore", channels=2), image)
    # each channel: mean 2 / 20, population std 1 / 10 -> -1, 1
    assert out.flatten().tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-5)


def test_zscore_inside_the_non_zero_region_leaves_zero_alone() -> None:
    image = torch.tensor([[[[0.0, 0.0, 2.0, 4.0]]]])
    out = run(normalization_transforms("image", "zscore_nonzero"), image)
    # non-zero voxels 2 and 4: mean 3, std 1 -> -1, 1; the zeros stay 0
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, -1.0, 1.0], abs=1e-5)


def test_window_is_todays_behaviour() -> None:
    image = torch.tensor([[[[-2000.0, -1000.0, 0.0, 1000.0, 5000.0]]]])
    out = run(normalization_transforms("image", "window", a_min=-1000.0, a_max=1000.0), image)
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_one_mode_per_channel_keeps_the_metadata() -> None:
    image = MetaTensor(
        torch.tensor([[[[-1000.0, 300.0]]], [[[2.0, 6.0]]]]),
        affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])),
    )
    intensity = {"low": [-100.0, None], "high": [100.0, None], "mean": [0.0, None], "std": [50.0, None]}
    out = run(normalization_transforms("image", ["ct", "zscore"], intensity, channels=2), image)
    # channel 0: clipped to -100, 100 -> -2, 2; channel 1: mean 4, std 2 -> -1, 1
    assert out[0].flatten().tolist() == pytest.approx([-2.0, 2.0])
    assert out[1].flatten().tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert isinstance(out, MetaTensor) and np.allclose(out.affine.numpy(), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("normalize", "intensity", "channels", "message"),
    [
        (
            "minmax",
            None,
            1,
            "data.normalize='minmax' is not a normalisation; use one of " + ", ".join(NORMALIZE_MODES),
        ),
        (
            ["ct"],
            {"low": [0.0], "high": [1.0], "mean": [0.0]},
            1,
            "data.normalize=ct needs data.intensity.std",
        ),
        ("zscore", {"low": [0, 1]}, 1, "data.intensity.low has 2 value(s) but the images have 1 channel(s)"),
        (["zscore"], None, 2, "data.normalize lists 1 modes but the images have 2 channel(s)"),
        ("ct", {"low": [5], "high": [1], "mean": [0], "std": [1]}, 1, "need low < high and std > 0"),
        ("zscore", {"median": [1]}, 1, "data.intensity.median: not an intensity setting"),
    ],
)
def test_wrong_settings_are_one_message_naming_the_option(normalize, intensity, channels, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        normalization_transforms("image", normalize, intensity, channels=channels)


# -- in the pipeline: settings, cache key, what a bundle can rebuild ------------------------------------------


def old_window_pipeline(mode: str) -> list:
    """The deterministic transforms as they were before data.normalize existed (window only)."""
    keys = ["image", "label"]
    steps = [LoadCased(keys=keys, image_only=True), mt.EnsureChannelFirstd(keys=keys)]
    steps.append(mt.Orientationd(keys=keys, axcodes="RAS", labels=None))
    if mode == "resize":
        steps.append(mt.Resized(keys=keys, spatial_size=(64, 64, 32), mode=["trilinear", "nearest"]))
    else:
        steps.append(mt.Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=["bilinear", "nearest"]))
    steps.append(
        mt.ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True)
    )
    steps.append(mt.EnsureTyped(keys=keys, dtype="float32", track_meta=True))
    steps.append(CompactLabeld(keys="label"))
    return steps


@pytest.mark.parametrize("mode", ["resize", "patch"])
def test_window_keeps_the_disk_cache_key_it_had(mode: str) -> None:
    settings = DataSettings.from_options(
        **{
            **signature_defaults(SegDataModule.__init__),
            "demo": {},
            "spatial_size": [64, 64, 32],
            "mode": mode,
        }
    )
    assert settings.normalization == NormalizationSettings("window", None)
    new = [t for t in pipeline(settings, train=False).transforms]
    assert pipeline_signature(mt.Compose(new)) == pipeline_signature(mt.Compose(old_window_pipeline(mode)))
    ct = DataSettings.from_options(
        **{
            **signature_defaults(SegDataModule.__init__),
            "demo": {},
            "mode": mode,
            "normalize": "ct",
            "intensity": {"low": -100, "high": 200, "mean": 40, "std": 50},
        }
    )
    assert pipeline_signature(pipeline(ct, train=False)) != pipeline_signature(
        mt.Compose(old_window_pipeline(mode))
    )


def test_one_mode_for_all_channels_is_made_of_monai_transforms_a_bundle_can_rebuild() -> None:
    intensity = {"low": [-100.0, -100.0], "high": [200.0, 200.0], "mean": [40.0, 10.0], "std": [50.0, 20.0]}
    for normalize in ("window", "zscore", "zscore_nonzero", "ct"):
        steps = normalization_transforms("image", normalize, intensity if normalize == "ct" else None)
        assert not any(isinstance(s, SEGLIGHT_ONLY) for s in steps), normalize
        assert all(type(s).__module__.startswith("monai.") for s in steps), normalize
    # Clip ranges that differ between channels, and a mode per channel, need seglight's own transforms.
    different = {**intensity, "high": [200.0, 300.0]}
    assert isinstance(normalization_transforms("image", "ct", different)[0], ClipIntensityd)
    assert isinstance(normalization_transforms("image", ["ct", "zscore"], intensity)[0], PerChannelNormalized)
    # The channels come from the settings when not given: two intensity values per key, two channels.
    image = torch.tensor([[[[-1000.0, 300.0]]], [[[-1000.0, 300.0]]]])
    out = run(normalization_transforms("image", "ct", intensity), image)
    assert out[0].flatten().tolist() == pytest.approx([-2.8, 3.2]) and out[
        1
    ].flatten().tolist() == pytest.approx([-5.5, 9.5])


def test_the_value_range_the_network_sees() -> None:
    assert value_range("window") == [0.0, 1.0] and value_range(["zscore"]) is None
    intensity = {"low": [-100.0], "high": [200.0], "mean": [40.0], "std": [50.0]}
    assert value_range("ct", intensity) == [-2.8, 3.2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"normalize": "ct"}, "data.normalize=ct needs data.intensity.low for channel 0"),
        ({"normalize": "gamma"}, "data.normalize='gamma' is not a normalisation"),
        ({"intensity": [1, 2]}, "data.intensity must be a mapping of low, high, mean, std"),
        (
            {"normalize": ["zscore", "window"], "intensity": {"mean": [1.0]}},
            "data.intensity.mean has 1 value(s)",
        ),
    ],
)
def test_the_data_module_checks_its_normalisation(tmp_path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        SegDataModule(demo={"cache_dir": str(tmp_path)}, **options)


def test_per_channel_settings_must_fit_the_images(tmp_path) -> None:
    module = SegDataModule(
        demo={"cache_dir": str(tmp_path), "num_cases": 2, "shape": [16, 16, 8]},
        normalize=["zscore", "zscore"],
        num_workers=0,
        cache="none",
        val_fraction=0.5,
    )
    with pytest.raises(ConfigError, match=re.escape("give 2 channel(s) but the images have 1")):
        module.setup()


def signature_defaults(function) -> dict:
    return {
        k: p.default for k, p in inspect.signature(function).parameters.items() if p.default is not p.empty
    }
