"""Extending a finished run: an ``auto``-length schedule follows the new ``trainer.max_epochs``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import run_cli, tensorboard_scalars, tiny_overrides

pytestmark = pytest.mark.slow

LR = 1e-3


def test_cosine_schedule_follows_the_extended_length(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["scheduler=cosine", f"optimizer.lr={LR}", *tiny_overrides(run_dir)]
    first = run_cli("seglight.train", *common)  # 2 epochs: cosine over 2
    assert first.returncode == 0, first.stderr[-3000:]
    extended = run_cli("seglight.train", *common, "resume=true", "trainer.max_epochs=4")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert (
        "Learning-rate schedule: 4 epochs long (was 2 in the checkpoint)" in extended.stdout + extended.stderr
    )

    curve = tensorboard_scalars(run_dir)
    tag = next(t for t in curve if t.startswith("lr-"))
    rates = [value for _, value in sorted(curve[tag])]
    # Epochs 0-1 ran planned for 2 epochs; epochs 2-3 continue as if 4 had been planned from the start,
    # instead of staying at the first schedule's end (0).
    cosine = [LR * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in (2, 3)]
    assert rates[:2] == pytest.approx([LR, LR / 2], rel=1e-5)
    assert rates[2:] == pytest.approx(cosine, rel=1e-5)
