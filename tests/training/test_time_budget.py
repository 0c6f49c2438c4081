"""TimeBudget: after each epoch, the epochs that still fit before the deadline, ending on one that validates; a
run past its deadline stops after the epoch it is in."""

from __future__ import annotations

import json
import time
from pathlib import Path

from seglight.training.callbacks.time_budget import END_SECONDS, TimeBudget
from tests.helpers import tiny_overrides, train_in_process


def test_the_epochs_that_fit_end_on_a_validating_epoch() -> None:
    budget = TimeBudget(deadline=time.time() + 100.0 + END_SECONDS)
    budget._epochs = [
        30.0,
        10.0,
        10.0,
        10.0,
    ]  # the first paid for warm-up: the median of the last three counts
    budget._last_validation_s = 5.0
    # 3 epochs done, a validation every 2: 7 more end on epoch 10 with 4 validations: 70 + 20 s <= 100 s.
    assert budget.epochs_that_fit(3, 2) == 10
    assert budget.epochs_that_fit(3, 1) == 9  # 7 more and 7 validations: 105 s > 100; 6 and 6: 90 s
    late = TimeBudget(deadline=time.time() - 1.0)
    late._epochs = [10.0]
    assert late.epochs_that_fit(4, 1) == 4  # nothing more fits: stop after this epoch


def test_a_run_past_its_deadline_stops_after_its_first_epoch(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [
        *tiny_overrides(tmp_path),
        "trainer.max_epochs=3",
        f"+callbacks.time_budget={{_target_:seglight.training.callbacks.time_budget.TimeBudget,deadline:{time.time()}}}",
    ]
    assert train_in_process(overrides, tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1 and summary["validations"] == 1
