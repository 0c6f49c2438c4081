"""What a run does with bad cases (``data.on_bad_case``): refuse to train (``error``), or leave them out and list
them in ``skipped_cases.json`` (``skip``).

A case is bad when the check before training finds an error in it (``seglight.data.checks``), when it fails to
preprocess, or, with ``data.cache=none``, when a loader worker first reads it during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from seglight.core.errors import DataError
from seglight.core.io import atomic_write_text
from seglight.data.check_report import DatasetReport
from seglight.data.datalists import LABEL, Case

log = logging.getLogger("seglight")

Skipped = dict[str, Any]  # {"case_id": ..., "problems": [...]}


class SkippedCases:
    """A run's ``skipped_cases.json`` (``data.on_bad_case=skip``), which any process of the run may add to.

    With ``data.cache=none`` a bad training case is found by whichever loader worker reads it first; each adds
    its case under a file lock, so the record of the whole run ends up in one file.
    """

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._reported: set[str] = set()

    def write(self, skipped: list[Skipped]) -> None:
        """Record ``skipped`` (case id and problems each), replacing what an earlier session recorded."""
        if self.path is not None:
            with self._lock():
                self._save(skipped)

    def __call__(self, case: Case, message: str) -> None:
        """Report and record one case found bad while training (training goes on without it)."""
        case_id = str(case.get("case_id"))
        if case_id in self._reported:
            return
        self._reported.add(case_id)
        log.warning("Skipping case %s (data.on_bad_case=skip): %s", case_id, message)
        if self.path is None:
            return
        with self._lock():
            try:
                skipped = json.loads(self.path.read_text()).get("skipped", [])
            except (OSError, ValueError, AttributeError):
                skipped = []
            if all(entry.get("case_id") != case_id for entry in skipped):
                self._save([*skipped, {"case_id": case_id, "problems": [message]}])

    def _lock(self) -> Any:
        from filelock import FileLock

        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.with_name(f".{self.path.name}.lock")))

    def _save(self, skipped: list[Skipped]) -> None:
        assert self.path is not None
        atomic_write_text(self.path, json.dumps({"on_bad_case": "skip", "skipped": skipped}, indent=2))


class BadCasePolicy:
    """``data.on_bad_case`` applied to a run's cases; ``skipped`` lists the cases left out, with their problems.

    Args:
        action: ``error`` refuses a dataset with a bad case; ``skip`` leaves such cases out.
        skipped_path: where ``skip`` lists them (``skipped_cases.json``).
    """

    def __init__(self, action: str, skipped_path: str | None) -> None:
        self.action = action
        self.skipped_path = skipped_path
        self.skipped: list[Skipped] = []

    def recorder(self) -> SkippedCases | None:
        """What reports and records a case found bad while training reads it (``skip``); None for ``error``."""
        return SkippedCases(self.skipped_path) if self.action == "skip" else None

    def checked(self, cases: list[Case], report: DatasetReport) -> list[Case]:
        """The cases the check before training found no error in; ``error`` raises the check's errors instead."""
        log_check_warnings(report)
        bad = report.bad_cases()
        if bad and self.action == "error":
            report.raise_for_errors()
        self.skipped = [{"case_id": cases[i]["case_id"], "problems": bad[i]} for i in sorted(bad)]
        return [case for i, case in enumerate(cases) if i not in bad]

    def without_failed(
        self, failed: dict[str, str], train: list[Case], val: list[Case], writes_files: bool
    ) -> tuple[list[Case], list[Case]]:
        """The training and validation cases without those that failed to preprocess (``failed``: case id ->
        problem); ``error`` refuses any failure, ``skip`` records them (global rank 0 writes the file)."""
        if failed and self.action == "error":
            lines = list(failed.values())
            raise DataError(
                lines[0]
                if len(lines) == 1
                else f"{len(lines)} cases cannot be used:\n  " + "\n  ".join(lines)
            )
        self.skipped += [{"case_id": c, "problems": [m]} for c, m in failed.items()]
        train = [c for c in train if c["case_id"] not in failed]
        val = [c for c in val if c["case_id"] not in failed]
        if self.action != "skip":
            return train, val
        if writes_files:
            SkippedCases(self.skipped_path).write(self.skipped)
        if self.skipped:
            log.warning(
                "Skipping %d bad case(s) (data.on_bad_case=skip), listed in %s: %s",
                len(self.skipped),
                self.skipped_path,
                "; ".join(p for s in self.skipped for p in s["problems"]),
            )
        if not train or not val:
            raise DataError(
                f"after skipping {len(self.skipped)} bad case(s), {len(train)} training and {len(val)} validation "
                "cases remain; training needs at least one of each"
            )
        return train, val


def warn_empty_labels(cases: list[Case], items: list[Any]) -> None:
    """A warning per case whose preprocessed label has no foreground voxel (the header check cannot see it; the
    cached volumes are in memory, so the look costs nothing)."""
    for case, item in zip(cases, items, strict=False):
        label = item.get(LABEL) if isinstance(item, dict) else None
        if isinstance(label, torch.Tensor) and not bool(label.any()):
            log.warning(
                "Data check: %s: the label is all background after preprocessing (no labelled voxel)",
                case["case_id"],
            )


def log_check_warnings(report: DatasetReport, limit: int = 5) -> None:
    """The check's first ``limit`` warnings, and how many more there are."""
    warnings = report.warnings
    for finding in warnings[:limit]:
        log.warning("Data check: %s", finding)
    if len(warnings) > limit:
        log.warning(
            "Data check: %d more warnings; python -m seglight.check lists them all", len(warnings) - limit
        )
