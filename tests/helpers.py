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


def train_in_process(overrides: list[str], run_dir: Path, quiet: bool = True) -> int:
    """Do what ``python -m seglight.train overrides`` does, in this process; returns the exit status.

    Errors are reported as the entry point reports them (one ``seglight.train: error: ...`` line on stderr,
    status 2), without paying a subprocess's start-up: read the message with pytest's ``capsys``. ``quiet``
    drops the trackers and callbacks (checkpoints, preemption...) that the test does not need.
    """
    from seglight.config.builder import compose
    from seglight.core.errors import reported_errors
    from seglight.train import train

    quiet_overrides = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false"] if quiet else []
    cfg = compose([*overrides, *quiet_overrides], output_dir=run_dir)
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


def plug_callback(key: str, target: str, /, **settings: object) -> str:
    """The override that adds a test callback to a run: ``+callbacks.<key>={_target_:tests.callbacks.<target>,...}``.

    Strings are quoted, so paths and glob patterns pass Hydra's override grammar.
    """
    items = [f"_target_:tests.callbacks.{target}"]
    for setting, value in settings.items():
        items.append(f"{setting}:'{value}'" if isinstance(value, str | Path) else f"{setting}:{value}")
    return f"+callbacks.{key}={{{','.join(items)}}}"
