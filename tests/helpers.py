"""Helpers shared by the tests: tiny real NIfTI datasets, the overrides that keep runs small, running the CLI.

Plain functions, imported as ``from tests.helpers import ...``; fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPE = [24, 24, 16]
TINY_SIZE = [16, 16, 16]
SECRET = (
    "seglight-test-secret-do-not-log-8f3a"  # the test S3 server's secret: must never reach a config or log
)


def tiny_overrides(run_dir: Path) -> list[str]:
    """Overrides for a seconds-long CPU run on a tiny demo dataset."""
    return [
        "data.demo.num_cases=6",
        f"data.demo.shape=[{','.join(map(str, TINY_SHAPE))}]",
        f"data.spatial_size=[{','.join(map(str, TINY_SIZE))}]",
        "data.num_workers=0",
        "data.batch_size=2",
        "model.init_filters=8",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run_dir}",
    ]


def run_cli(
    module: str, *args: str, cache: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` as a user would, with the session's test cache (or ``cache``)."""
    return run_command([sys.executable, "-m", module, *args], cache=cache, cwd=REPO, timeout=timeout)


def run_command(
    command: list[str], cache: Path | None = None, cwd: Path = REPO, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``command`` as a user's shell would: plain Hydra errors, no Python warnings, stdin closed."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    if cache is not None:
        env["SEGLIGHT_CACHE_DIR"] = str(cache)
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # as in CI or a background job: nothing may wait for a terminal
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_on(root: Path, run_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m seglight.train`` for one tiny epoch on the MSD dataset at ``root``."""
    return run_cli(
        "seglight.train",
        "data=msd",
        f"data.root={root}",
        "data.spatial_size=[16,16,8]",
        "data.num_workers=0",
        "model.init_filters=8",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
        *extra,
        cache=cache,
    )


def write_nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    """Save ``data`` as a real NIfTI file with a simple anisotropic affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


def make_msd_dataset(root: Path, num_cases: int = 4, shape=(20, 20, 12), label_key: str = "label") -> Path:
    """A small MSD-layout dataset with a bright cube labelled 1 in each case."""
    training = []
    rng = np.random.default_rng(0)
    for i in range(num_cases):
        image = rng.normal(0, 50, size=shape).astype(np.float32) - 200
        label = np.zeros(shape, dtype=np.uint8)
        label[4:12, 5:13, 3:9] = 1
        image[label == 1] += 400
        write_nifti(root / "imagesTr" / f"case_{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label)
        training.append({"image": f"imagesTr/case_{i}.nii.gz", label_key: f"labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"name": "tiny", "labels": {"0": "background", "1": "cube"}, "training": training})
    )
    return root


def tiny_config(run_dir: Path, *overrides: str):
    """The tiny run's config composed in-process (as ``seglight.compose`` does in a notebook), writing to ``run_dir``."""
    from seglight import compose

    base = [o for o in tiny_overrides(run_dir) if not o.startswith("hydra.")]
    return compose([*base, *overrides], output_dir=run_dir)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of a run folder's TensorBoard events (all event files), as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train_in_process(overrides: list[str], run_dir: Path) -> int:
    """Do what ``python -m seglight.train overrides`` does, in this process; returns the exit status.

    Errors are reported as the entry point reports them (one ``seglight.train: error: ...`` line on stderr,
    status 2), without paying a subprocess's start-up: read the message with pytest's ``capsys``.
    """
    from seglight.config.builder import compose
    from seglight.core.errors import reported_errors
    from seglight.train import train

    quiet = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"]
    cfg = compose([*overrides, *quiet], output_dir=run_dir)
    try:
        with reported_errors("seglight.train"):
            train(cfg)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@dataclass
class S3:
    """The test S3 server (see the ``s3`` fixture): its endpoint and a boto3 client for it."""

    endpoint: str
    client: object

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Put every file under ``folder`` into ``bucket/prefix``; returns the ``s3://`` URL of the prefix."""
        self.client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(
    name: str, *args: str, cache: Path | None = None, cwd: Path = REPO, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run an installed console script (``seglight-predict args``) as a user would, with the session's test
    cache (or ``cache``)."""
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{script} is not installed: run pip install -e . to install the console scripts"
    return run_command([str(script), *args], cache=cache, cwd=cwd, timeout=timeout)


def make_subject_folders(
    root: Path,
    subjects: list[str] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Subject folders as the reference lab keeps them: ``root/<subject>/img.nii.gz`` and ``label.nii.gz``.

    Every subject's files have the same names; ``files`` maps a role (``label``, else an image channel) to the
    file name. Each image is a bright cube (labelled 1) on a dark background; subjects differ in size along x
    (20, 22, 24 voxels), so a mask shows which subject it was predicted from.
    """
    subjects = subjects or [f"subj_{i:03d}" for i in range(4)]
    files = files or {"image": "img.nii.gz", "label": "label.nii.gz"}
    rng = np.random.default_rng(1)
    for number, subject in enumerate(subjects):
        shape = (20 + 2 * (number % 3), 20, 12)
        label = np.zeros(shape, dtype=np.uint8)
        label[4:12, 5:13, 3:9] = 1
        for role, name in files.items():
            if role == "label":
                write_nifti(root / subject / name, label)
            else:
                image = rng.normal(0, 50, size=shape).astype(np.float32) - 200
                write_nifti(root / subject / name, image + 400.0 * label)
    return root


def make_planning_dataset(
    root: Path,
    cases: list[tuple[tuple[int, int, int], tuple[float, float, float]]],
    modality: str = "CT",
    declared: bool = True,
    obj: tuple[int, int, int] | None = None,
    body: float = 0.75,
    labels: int = 1,
) -> Path:
    """An MSD-layout dataset for the planning rules: one (shape, spacing) per case, x y z, RAS affines.

    CT: air (-1000) around a body of soft tissue (40 +- 10 HU) holding an object at 150 +- 10 HU. Otherwise
    (MRI-like): 0 around the body, tissue at 300 +- 30, the object at 600 +- 30. The body fills ``body`` of each
    axis (centred); the object is a centred box of ``obj`` voxels (default: a third of the shape). ``labels=2``
    adds a second class: one voxel-thick slab of 2 x 2 voxels beside the object. ``declared=False`` leaves the
    modality out of dataset.json (the plan guesses it).
    """
    rng = np.random.default_rng(7)
    ct = modality.upper() == "CT"
    training = []
    for index, (shape, spacing) in enumerate(cases):
        box = obj or tuple(max(1, n // 3) for n in shape)
        inside = tuple(slice((n - b) // 2, (n - b) // 2 + b) for n, b in zip(shape, box, strict=True))
        extent = tuple(max(1, round(n * body)) for n in shape)
        region = tuple(slice((n - e) // 2, (n - e) // 2 + e) for n, e in zip(shape, extent, strict=True))
        label = np.zeros(shape, dtype=np.uint8)
        label[inside] = 1
        if labels == 2:
            label[0:2, 0:2, shape[2] // 2] = 2
        background, tissue, target, noise = (-1000.0, 40.0, 150.0, 10.0) if ct else (0.0, 300.0, 600.0, 30.0)
        image = np.full(shape, background, dtype=np.float32)
        image[region] = tissue + rng.normal(0, noise, size=image[region].shape)
        image[label > 0] = target + rng.normal(0, noise, size=int((label > 0).sum()))
        write_nifti(root / "imagesTr" / f"case_{index}.nii.gz", image, spacing)
        write_nifti(root / "labelsTr" / f"case_{index}.nii.gz", label, spacing)
        training.append({"image": f"imagesTr/case_{index}.nii.gz", "label": f"labelsTr/case_{index}.nii.gz"})
    names = {"0": "background", "1": "object"} | ({"2": "speck"} if labels == 2 else {})
    meta = {"name": "planning", "labels": names, "training": training}
    if declared:
        meta["modality"] = {"0": modality}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def plan_for(root: Path, run_dir: Path, *overrides: str):
    """``python -m seglight.plan``'s work in this process for the MSD dataset at ``root``: (fingerprint, plan).

    A tiny SegResNet unless the overrides choose another model; steps are timed on the CPU.
    """
    from hydra.utils import instantiate

    from seglight import compose
    from seglight.plan import module_factory
    from seglight.planning.fingerprint import fingerprint_dataset
    from seglight.planning.planner import make_plan
    from seglight.planning.settings import DataSettings, PlanSettings, plan_target

    base = ["data=msd", f"data.root={root}", "data.num_workers=1", "trainer=cpu", "plan.measure_steps=1"]
    if not any(o.startswith("model=") for o in overrides):
        base.append("model.init_filters=8")
    cfg = compose([*base, *overrides], config_name="plan", output_dir=run_dir)
    settings = PlanSettings.from_config(cfg.plan)
    fingerprint = fingerprint_dataset(instantiate(cfg.data, _convert_="all"))
    target = plan_target(settings, False, str(cfg.trainer.precision), run_dir / "cache")
    model = dict(cfg.model)
    plan = make_plan(
        fingerprint, settings, DataSettings.from_config(cfg.data), model, module_factory(cfg), target, 1
    )
    return fingerprint, plan
