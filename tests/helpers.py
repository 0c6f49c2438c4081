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
from typing import Any

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


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(
    folder: Path,
    image: nib.Nifti1Image,
    series_number: int = 3,
    patient_id: str = "PAT1",
    study_date: str = "20240102",
    study_uid: str | None = None,
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class: str = CT_IMAGE_STORAGE,
    numbers: list[int] | None = None,
    prefix: str = "IM",
) -> list[Path]:
    """A real CT series (one file per slice) holding a NIfTI image's values with its exact geometry.

    Each slice k of the image becomes a file whose ImagePositionPatient, ImageOrientationPatient and PixelSpacing
    are the image's affine converted to DICOM's LPS; the values are stored as ``(value - intercept) / slope`` in
    signed 16 bits. ``numbers`` gives slice k's InstanceNumber (and file name); default: k + 1.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import DSfloat

    def ds(values) -> list:
        return [DSfloat(float(v), auto_format=True) for v in values]

    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(image.dataobj, dtype=np.float64)
    affine = image.affine
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_direction = lps @ affine[:3, 0] / spacing[0]
    column_direction = lps @ affine[:3, 1] / spacing[1]
    study_uid = study_uid or generate_uid(entropy_srcs=[patient_id, study_date])
    series_uid = series_uid or generate_uid()
    frame_of_reference = generate_uid(entropy_srcs=[study_uid, "frame"])
    written = []
    count = data.shape[2]
    for k in range(count):
        number = numbers[k] if numbers is not None else k + 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        d = Dataset()
        d.file_meta = meta
        d.SOPClassUID, d.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        d.PatientName, d.PatientID, d.PatientBirthDate, d.PatientSex = (
            "Test^Patient",
            patient_id,
            "19700101",
            "O",
        )
        d.StudyInstanceUID, d.StudyDate, d.StudyTime, d.StudyID = study_uid, study_date, "101010", "1"
        d.AccessionNumber, d.ReferringPhysicianName = "A1", ""
        d.SeriesInstanceUID, d.SeriesNumber, d.Modality = series_uid, series_number, "CT"
        d.SeriesDescription = f"test series {series_number}"
        d.FrameOfReferenceUID, d.PositionReferenceIndicator = frame_of_reference, ""
        d.Manufacturer = "seglight tests"
        d.InstanceNumber = number
        d.ImageType = list(image_type)
        d.ImagePositionPatient = ds(lps @ (affine @ [0, 0, k, 1])[:3])
        d.ImageOrientationPatient = ds([*row_direction, *column_direction])
        d.PixelSpacing = ds([spacing[1], spacing[0]])  # between rows, between columns
        d.SliceThickness = DSfloat(float(spacing[2]), auto_format=True)
        d.Rows, d.Columns = data.shape[1], data.shape[0]
        d.SamplesPerPixel, d.PhotometricInterpretation = 1, "MONOCHROME2"
        d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 16, 16, 15, 1
        d.RescaleSlope, d.RescaleIntercept = ds([slope])[0], ds([intercept])[0]
        stored = np.rint((data[:, :, k].T - intercept) / slope).astype(np.int16)
        d.PixelData = stored.tobytes()
        path = folder / f"{prefix}{number:04d}.dcm"
        pydicom.dcmwrite(path, d, enforce_file_format=True)
        written.append(path)
    return written


def nifti_with_affine(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> nib.Nifti1Image:
    """A NIfTI image of whole HU values (-1000..1500) with a bright cube, on ``affine``."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    data[2:8, 3:9, 2:6] = 2000.0
    return nib.Nifti1Image(data, affine)


# DICOM test volumes: their shape, and array axes -> RAS mm as NIfTI writes them.
SHAPE = (20, 18, 16)
# AXIAL is DICOM's usual axial grid (rows run left, columns back).
AXIAL = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 80.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])
CORONAL = np.array([[-0.7, 0, 0, 10.0], [0, 0, -2.0, 20.0], [0, -0.9, 0, 30.0], [0, 0, 0, 1]])
TILTED = AXIAL + np.array([[0, 0, 0, 0], [0, 0, 0.4, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # a sheared grid


def oblique() -> np.ndarray:
    """Rotated about all three axes, with anisotropic voxels."""
    a, b, c = np.radians([20.0, 10.0, -15.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([0.9, 1.1, 2.2])
    affine[:3, 3] = [5.0, -7.0, 12.0]
    return affine


def as_dicom_orders(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The image as a DICOM reader must return it: slices ascending along the slice normal (row x column
    direction, in LPS), so an image whose third axis points the other way comes back flipped along it."""
    lps = np.diag([-1.0, -1.0, 1.0])
    normal = np.cross(lps @ image.affine[:3, 0], lps @ image.affine[:3, 1])
    if float(np.dot(normal, lps @ image.affine[:3, 2])) > 0:
        return image
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, image.shape[2] - 1  # voxel k of the flipped image is voxel n-1-k
    return nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::-1], image.affine @ flip)


def tiny_checkpoint(run_dir: Path, *overrides: str) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` of a one-epoch tiny run on the demo data (16x16x8), trained in-process."""
    # A network sized by model.filters (DynUNet) has no init_filters (SegResNet's).
    sized = any(o.startswith("model.filters=") for o in overrides)
    base = [o for o in tiny_overrides(run_dir) if not (sized and o.startswith("model.init_filters"))]
    status = train_in_process(
        [*base, "data.spatial_size=[16,16,8]", "trainer.max_epochs=1", *overrides], run_dir
    )
    assert status == 0
    (written,) = (run_dir / "checkpoints").glob("*.ckpt")
    return written.rename(run_dir / "checkpoints" / "last.ckpt")


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
    from seglight.config.plans import module_factory
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


def block_label(shape: tuple[int, ...], values: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Two boxes with even start and stop on every axis; no flip or axis swap maps the label onto itself."""
    label = np.zeros(shape, dtype=np.uint8)
    a = tuple(slice(n // 8, 3 * n // 8) for n in shape)
    b = (slice(5 * shape[0] // 8, 7 * shape[0] // 8), a[1], slice(5 * shape[2] // 8, 6 * shape[2] // 8))
    label[a] = values[0]
    label[b] = values[1]
    return label


def intensity_checkpoint(
    path: Path,
    cases: list[dict[str, str]],
    classes: int,
    size: tuple[int, int, int] = (16, 16, 16),
    label_names: dict[int, str] | None = None,
    **data: Any,
) -> Path:
    """A real Lightning checkpoint (1 epoch at lr 0) of a network that maps windowed intensity to the label: a
    1x1x1 convolution of the image's channels (cases whose image is a list of files have several) in which only
    the first channel counts (``data``: more data module settings, e.g. another normalisation)."""
    import lightning as L
    import torch

    from seglight import SegDataModule, SegModule

    channels = len(cases[0]["image"]) if isinstance(cases[0]["image"], list) else 1
    conv = {"_target_": "torch.nn.Conv3d", "in_channels": channels, "out_channels": classes, "kernel_size": 1}
    datamodule = SegDataModule(
        datalist=cases,
        spatial_size=list(size),
        num_workers=0,
        batch_size=1,
        cache="none",
        val_fraction=0.5,
        **data,
    )
    module = SegModule(
        net=conv,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.0},
        label_names=label_names
        or ({0: "background", 1: "organ"} if classes == 1 else {0: "background", 1: "a", 2: "b"}),
        metrics={"hd95": False},
        data=datamodule.prediction_settings(),  # as seglight.build saves it
    )
    with torch.no_grad():
        if classes == 1:  # sigmoid(20 x - 10): foreground where x (0 or 1 here) is bright
            weights, bias = [20.0], [-10.0]
        else:  # argmax of three lines in x: 0 at x=0, 1 at x=0.5, 2 at x=1
            weights, bias = [-20.0, 0.0, 20.0], [5.0, 0.0, -15.0]
        first = torch.tensor(weights).reshape(classes, 1, 1, 1, 1)
        module.net.weight.copy_(torch.cat([first, torch.zeros(classes, channels - 1, 1, 1, 1)], dim=1))
        module.net.bias.copy_(torch.tensor(bias))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path


def plug_callback(key: str, target: str, /, **settings: object) -> str:
    """The override that adds a test callback to a run: ``+callbacks.<key>={_target_:tests.callbacks.<target>,...}``.

    Strings are quoted, so paths and glob patterns pass Hydra's override grammar.
    """
    items = [f"_target_:tests.callbacks.{target}"]
    for setting, value in settings.items():
        items.append(f"{setting}:'{value}'" if isinstance(value, str | Path) else f"{setting}:{value}")
    return f"+callbacks.{key}={{{','.join(items)}}}"


def hide_package(tmp_path: Path, monkeypatch, name: str) -> None:
    """Subprocesses started from here see a Python without ``name``, as a user may have: importing it fails."""
    blocked = tmp_path / "blocked" / name
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocked.parent))
