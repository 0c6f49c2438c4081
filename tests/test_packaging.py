"""The configs ship inside the wheel, so a non-editable install composes the same config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_wheel_ships_configs_and_composes_from_them(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info/ next to the sources.
    source = tmp_path / "src"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info")
    )
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("seglight-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("train.yaml", "model/segresnet.yaml", "data/demo.yaml", "trainer/default.yaml"):
        assert f"seglight/conf/{config}" in names
    assert "seglight/sagemaker/job.py" in names  # what sagemaker/train.py runs in the container

    # Import seglight from the unpacked wheel (ahead of the editable checkout) and compose from its configs.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import seglight, seglight.config.builder as b; "
        "cfg = b.compose(['model=unet'], output_dir='out'); "
        "print(seglight.__file__); print(cfg.model._target_)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    module_file, target = run.stdout.strip().splitlines()[-2:]
    assert module_file.startswith(str(site)) and target == "monai.networks.nets.UNet"


def test_public_names_are_the_functions_whatever_was_imported_first() -> None:
    code = (
        "import seglight.config.builder, seglight.train; from seglight import SegModule, SegDataModule, compose, build; "
        "assert callable(build) and build.__name__ == 'build' and compose.__name__ == 'compose'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
