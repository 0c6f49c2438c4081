"""The intensity normalisation transforms (data.normalize), against values computed by hand."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from seglight.core.errors import ConfigError
from seglight.data.normalization import NORMALIZE_MODES, normalization_transforms


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
