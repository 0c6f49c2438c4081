"""The benchmarks run: ``make bench``'s script at toy sizes prints one well-formed table and writes the JSON figures;
``gpu.py`` without a GPU says so in one line. No timing is asserted (CI machines are shared and slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO


def bench(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_make_bench_at_toy_sizes_prints_one_table_and_writes_the_figures(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = bench("benchmarks/run.py", "--smoke", "--results-dir", str(tmp_path), cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    table = out[out.index("seglight against the reference") :].splitlines()
    assert table[1].split()[:5] == ["benchmark", "unit", "seglight", "reference", "ratio"]
    rows = (
        "loader, epoch 2",
        "loader, epochs 2+",
        "step time, real path",
        "step time, bare Trainer",
        "time to Dice >= 0.0",
        "prediction",
    )
    for name in rows:
        assert any(line.startswith(name) for line in table), f"no row {name!r} in:\n{out}"

    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].stem.endswith("cores")
    record = json.loads(files[0].read_text())
    assert record["machine"]["cores"] >= 1
    sections = record["benchmarks"]
    assert {"loader", "step_overhead", "time_to_dice", "prediction"} <= set(sections)
    for section in sections.values():
        for row in section["rows"]:
            assert {"benchmark", "unit", "seglight", "reference", "ratio", "goal", "met"} <= set(row)
    steps = sections["step_overhead"]["details"]
    for key in ("real_path_s_per_step", "bare_trainer_s_per_step", "raw_s_per_step"):
        assert len(steps[key]) == 1 and steps[key][0] > 0  # one repeat of each, measured in the same run
    loader = sections["loader"]["details"]["runs"][0]
    assert len(loader["seglight"]) == len(loader["reference"]) == 2  # samples/s epoch by epoch
    assert all(s > 0 for s in loader["seglight"] + loader["reference"])
    assert sections["time_to_dice"]["rows"][0]["seglight"] > 0  # target 0: reached at the first validation
    if not torch.cuda.is_available():  # the GPU benchmark's code ran on the CPU
        gpu_rows = [row["benchmark"] for row in sections["gpu_code_on_cpu"]["rows"]]
        assert any("steps/s, 32" in name for name in gpu_rows) and any(
            "GPU busy" in name for name in gpu_rows
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu.py would measure")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path: Path, cache_dir: Path) -> None:
    result = bench("benchmarks/gpu.py", "--results-dir", str(tmp_path), cache=cache_dir, timeout=120)
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped: no CUDA GPU" in lines[0]
    assert not list(tmp_path.iterdir())  # no figures written
