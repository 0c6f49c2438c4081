"""The console scripts, run as a user runs them: a missing option is one line and leaves no folder behind; evaluate
and viz write their results and nothing else. (seglight-train, -predict and -check run in test_evaluate,
test_predict and test_check.)"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_predict_without_ckpt_is_one_line_and_leaves_nothing_behind(tmp_path: Path, cache_dir: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), scan)
    before = files_under(tmp_path)
    result = run_script("seglight-predict", f"input={scan}", cache=cache_dir, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "seglight.predict: error: ckpt= is required, e.g. python -m"
    )
    assert files_under(tmp_path) == before  # no dated outputs/predict/... folder, no log


def test_evaluate_and_viz_write_their_results_and_nothing_else(tmp_path: Path, cache_dir: Path) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    mask = np.zeros((12, 12, 8), np.uint8)
    mask[2:8, 2:8, 2:6] = 1
    noisy = mask.copy()
    noisy[10, 10, 7] = 1  # a one-voxel false positive apart from the organ
    for folder, data in ((gt, mask), (pred, noisy)):
        folder.mkdir()
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), folder / "case1.nii.gz")
    work = tmp_path / "work"
    work.mkdir()

    result = run_script(
        "seglight-evaluate",
        f"pred={pred}",
        f"gt={gt}",
        "determine_postprocessing=true",
        cache=cache_dir,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Scored 1 case(s)." in result.stdout and "keep the largest component" in result.stdout
    assert json.loads((pred / "postprocessing.json").read_text())["largest_component"] == [1]
    assert sorted(p.name for p in pred.iterdir()) == [
        "case1.nii.gz",
        "metrics.csv",
        "metrics_summary.json",
        "postprocessing.json",
    ]

    out = tmp_path / "pictures" / "case1.png"
    image = f"image={gt / 'case1.nii.gz'}"
    result = run_script(
        "seglight-viz", image, f"label={gt / 'case1.nii.gz'}", f"pred={pred / 'case1.nii.gz'}", f"out={out}",
        cache=cache_dir, cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"Wrote {out}" in result.stdout
    assert files_under(work) == []  # no log, no .hydra, no outputs/ where the commands ran
