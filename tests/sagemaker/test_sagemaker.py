"""SageMaker script mode: ``sagemaker/train.py`` run by AWS's own training toolkit, as a SageMaker container runs it.

A job is a folder laid out as SageMaker lays out ``/opt/ml``: ``input/config/hyperparameters.json`` with every
value JSON-encoded as the SageMaker Python SDK writes it, ``resourceconfig.json``, ``inputdataconfig.json``,
``input/data/<channel>/``, ``model/``, ``output/``, ``checkpoints/``. The toolkit's ``train`` command runs it
with ``SAGEMAKER_BASE_DIR`` pointing there: it copies the submit directory into ``code/`` and starts
``train.py`` with the hyperparameters as ``--name value`` arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from seglight.config.builder import build_trainer
from seglight.core.errors import ConfigError, DataError
from seglight.sagemaker.environment import SageMakerEnvironment
from seglight.sagemaker.hyperparameters import parse_arguments
from seglight.sagemaker.job import job_overrides
from tests.helpers import (
    REPO,
    make_msd_dataset,
    make_subject_folders,
    run_cli,
    tensorboard_scalars,
    write_nifti,
)

TOOLKIT_TRAIN = Path(sys.executable).with_name("train")  # sagemaker-training's console script
SOURCE_DIR = REPO / "sagemaker"
# Keeps each job to seconds on a CPU; passed as hyperparameters, as a user would.
TINY = {
    "data.spatial_size": [16, 16, 16],
    "model.init_filters": 8,
    "data.num_workers": 0,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.log_every_n_steps": 1,
}
# The lab's five hyperparameters (with a higher lr, for tiny data) and amp as a Python bool.
LAB = {"model_name": "SegResNet", "epochs": 3, "batch_size": 2, "lr": 1e-3, "val_interval": 2, "amp": True}


def sagemaker_job(base: Path, hyperparameters: dict, channels: dict[str, Path | None]) -> Path:
    """Lay out a SageMaker job folder; a channel given as None is an empty folder."""
    source = (
        base.parent / f"{base.name}-source"
    )  # what the SDK uploads: the source_dir, minus generated files
    shutil.copytree(
        SOURCE_DIR, source, ignore=shutil.ignore_patterns("wheels", "requirements.txt", "__pycache__")
    )
    config = base / "input" / "config"
    config.mkdir(parents=True)
    sdk_hyperparameters = {
        **hyperparameters,
        "sagemaker_program": "train.py",
        "sagemaker_submit_directory": str(source),
        "sagemaker_container_log_level": 20,
        "sagemaker_job_name": base.name,
        "sagemaker_region": "us-east-1",
    }
    (config / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in sdk_hyperparameters.items()})
    )
    group = {
        "instance_group_name": "homogeneousCluster",
        "instance_type": "ml.g5.xlarge",
        "hosts": ["algo-1"],
    }
    resources = {
        "current_host": "algo-1",
        "hosts": ["algo-1"],
        "current_instance_type": "ml.g5.xlarge",
        "current_group_name": "homogeneousCluster",
        "instance_groups": [group],
        "network_interface_name": "eth0",
    }
    (config / "resourceconfig.json").write_text(json.dumps(resources))
    channel_config = {
        "TrainingInputMode": "File",
        "S3DistributionType": "FullyReplicated",
        "RecordWrapperType": "None",
    }
    (config / "inputdataconfig.json").write_text(json.dumps({name: channel_config for name in channels}))
    for name, folder in channels.items():
        target = base / "input" / "data" / name
        if folder is None:
            target.mkdir(parents=True)
        else:
            shutil.copytree(folder, target)
    for folder in ("model", "output/data", "checkpoints"):  # SageMaker creates these before the job starts
        (base / folder).mkdir(parents=True)
    return base


def restart(base: Path, **changes: object) -> None:
    """The same job started again on a new instance: only ``checkpoints/`` (synced with S3) is restored."""
    for folder in ("code", "model", "output"):
        shutil.rmtree(base / folder)
    for folder in ("model", "output/data"):
        (base / folder).mkdir(parents=True)
    path = base / "input" / "config" / "hyperparameters.json"
    hyperparameters = json.loads(path.read_text())
    hyperparameters.update({k: json.dumps(v) for k, v in changes.items()})
    path.write_text(json.dumps(hyperparameters))


def run_job(base: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The toolkit's ``train`` command on the job folder, in SageMaker Studio's local mode (no DNS wait)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update(
        SAGEMAKER_BASE_DIR=str(base),
        SM_STUDIO_LOCAL_MODE="true",
        SEGLIGHT_CACHE_DIR=str(cache),
        PYTHONWARNINGS="ignore",
    )
    return subprocess.run(
        [str(TOOLKIT_TRAIN)],
        cwd=base,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failure_reason(base: Path, result: subprocess.CompletedProcess) -> str:
    """What SageMaker would show as the job's FailureReason, checked against the script's stderr."""
    assert result.returncode != 0, result.stdout[-2000:]
    reason = (base / "output" / "failure").read_text().strip()
    assert "\n" not in reason and reason.startswith("seglight.sagemaker: error: ")
    assert reason in result.stderr.splitlines()
    assert not (base / "output" / "success").exists()
    return reason


@dataclass
class LabJob:
    base: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    first_last: dict
    first_steps: list[int]
    first_model: dict


@pytest.fixture(scope="module")
def lab_job(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> LabJob:
    """The lab's job on its subject folders (3 epochs), then restarted with the checkpoints kept and 4 epochs."""
    root = tmp_path_factory.mktemp("sagemaker")
    # The lab's S3 prefix: one folder per subject, every subject's files named alike; labels named by hand.
    training = make_subject_folders(root / "processed", [f"subj_{i:03d}" for i in range(4)])
    validation = make_subject_folders(root / "validation", ["subj_100", "subj_101"])
    hyperparameters = {**LAB, **TINY, "data.labels": {"0": "background", "1": "organ"}}
    base = sagemaker_job(root / "job", hyperparameters, {"training": training, "validation": validation})
    first = run_job(base, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    first_last = torch.load(base / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    first_steps = [step for step, _ in tensorboard_scalars(base / "output")["Loss/train"]]
    first_model = torch.load(base / "model" / "model.ckpt", map_location="cpu", weights_only=True)
    shutil.copytree(base / "output", root / "first-output")
    restart(base, epochs=4)
    second = run_job(base, cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    return LabJob(base, first, second, first_last, first_steps, first_model)


def test_first_job_leaves_its_outputs_where_sagemaker_collects_them(lab_job: LabJob) -> None:
    base, first = lab_job.base.parent / "first-output", lab_job.first
    # The lab's hyperparameters as seglight options; amp=True asks for 16-bit, which the CPU turns down.
    assert "trainer.max_epochs=3" in first.stdout and "trainer.precision=16-mixed" in first.stdout
    assert "model=segresnet" in first.stdout and "data=folder" in first.stdout
    # Run folder -> SM_OUTPUT_DATA_DIR (output.tar.gz); the toolkit reported success.
    for name in (".hydra/config.yaml", "split.json", "summary.json", "progress.png", "train.log"):
        assert (base / "data" / name).is_file(), name
    assert (base / "success").exists() and not (base / "failure").exists()
    split = json.loads((base / "data" / "split.json").read_text())  # cases named after their folders
    assert split["train"] == [f"subj_{i:03d}" for i in range(4)] and split["val"] == ["subj_100", "subj_101"]
    summary = json.loads((base / "data" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["best_epoch"] == 1
    # TensorBoard event files -> SM_OUTPUT_DIR/tensorboard, read back with TensorBoard's reader.
    curves = tensorboard_scalars(base)
    assert len(curves["Loss/train"]) == 3 and len(curves["Dice/val"]) == 1  # validation every 2nd epoch
    # Checkpoints -> /opt/ml/checkpoints: last.ckpt after epoch 3, which had no validation (refreshed anyway).
    assert lab_job.first_last["epoch"] == 2 and lab_job.first_last["global_step"] == 6
    # The model file: the best checkpoint's weights with the composed config, labels and preprocessing.
    model = lab_job.first_model
    assert model["epoch"] == 1 and "optimizer_states" not in model
    assert model["hyper_parameters"]["label_names"] == {0: "background", 1: "organ"}
    assert model["datamodule_hyper_parameters"]["spatial_size"] == [16, 16, 16]
    config = model["config"]
    assert config["trainer"]["max_epochs"] == 3 and config["optimizer"]["lr"] == 1e-3
    assert config["data"]["batch_size"] == 2 and config["trainer"]["check_val_every_n_epoch"] == 2
    assert (
        config["model"]["_target_"] == "monai.networks.nets.SegResNet"
        and config["model"]["init_filters"] == 8
    )


def test_restart_with_more_epochs_continues_from_the_checkpoints(lab_job: LabJob) -> None:
    base, second = lab_job.base, lab_job.second
    assert "resume=true: continuing from" in second.stdout + second.stderr
    last = torch.load(base / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, lab_job.first_last["global_step"] + 2)
    # The new session's curves carry on after the first session's steps.
    steps = [step for step, _ in tensorboard_scalars(base / "output")["Loss/train"]]
    assert steps and min(steps) > max(lab_job.first_steps)
    assert len(tensorboard_scalars(base / "output")["Dice/val"]) == 1  # epoch 4's validation
    model = torch.load(base / "model" / "model.ckpt", map_location="cpu", weights_only=True)
    assert model["config"]["trainer"]["max_epochs"] == 4 and model["global_step"] == 8


def test_model_file_predicts_from_a_downloaded_model_tar_gz(
    lab_job: LabJob, tmp_path: Path, cache_dir: Path
) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # what SageMaker uploads from SM_MODEL_DIR
        tar.add(lab_job.base / "model", arcname=".")
    downloaded = tmp_path / "downloaded"
    with tarfile.open(archive) as tar:
        tar.extractall(downloaded, filter="data")
    scan = lab_job.base / "input" / "data" / "validation" / "subj_101" / "img.nii.gz"
    result = run_cli(
        "seglight.predict",
        f"ckpt={downloaded / 'model.ckpt'}",
        f"input={scan}",
        f"output={tmp_path / 'masks'}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mask = nib.load(tmp_path / "masks" / "img.nii.gz")
    assert mask.shape == nib.load(scan).shape


def test_unknown_hyperparameter_stops_the_job_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    data = make_msd_dataset(tmp_path / "data", num_cases=2)
    base = sagemaker_job(tmp_path / "job", {**LAB, "learning_rate": 1e-4}, {"training": data})
    reason = failure_reason(base, run_job(base, cache_dir))
    assert "unknown hyperparameter learning_rate" in reason
    assert "model_name, epochs, batch_size, lr, val_interval" in reason and "data.spatial_size" in reason
    assert not (base / "checkpoints" / "last.ckpt").exists()


def test_empty_channel_stops_the_job_naming_the_folder(tmp_path: Path, cache_dir: Path) -> None:
    base = sagemaker_job(tmp_path / "job", LAB, {"training": None})
    reason = failure_reason(base, run_job(base, cache_dir))
    channel = base / "input" / "data" / "training"
    assert f"training channel {channel} is empty" in reason and "dataset.json" in reason


def test_bad_case_found_in_training_stops_the_job_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    """A datalist as the lab writes it ("mask" labels), with one label file missing: refused at setup."""
    data = tmp_path / "data"
    entries = []
    for i in range(3):
        image = write_nifti(data / "images" / f"subj_{i}.nii.gz", np.zeros((8, 8, 8), np.float32))
        entries.append({"image": str(image.relative_to(data)), "mask": f"masks/subj_{i}.nii.gz"})
        if i:
            write_nifti(data / "masks" / f"subj_{i}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    (data / "train.json").write_text(json.dumps(entries))
    base = sagemaker_job(tmp_path / "job", {**LAB, **TINY}, {"training": data})
    reason = failure_reason(base, run_job(base, cache_dir))
    assert "masks/subj_0.nii.gz" in reason
    assert "data.label_key=mask" in (base / "output" / "data" / ".hydra" / "overrides.yaml").read_text()


# -- the same translation in-process: values, names, layouts, clusters ---------------------------------------


def environment(
    tmp_path: Path, channels: dict[str, Path], **variables: str
) -> tuple[SageMakerEnvironment, dict]:
    """The environment the toolkit would export for a job under ``tmp_path`` with these channels."""
    environ = {
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DIR": str(tmp_path / "output"),
        "SM_OUTPUT_DATA_DIR": str(tmp_path / "output" / "data"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        **{f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()},
        "SM_NUM_GPUS": "0",
        "SM_HOSTS": '["algo-1"]',
        **variables,
    }
    return SageMakerEnvironment.from_environ(environ), environ


def overrides_for(
    argv: list[str], tmp_path: Path, channels: dict[str, Path], **variables: str
) -> dict[str, str]:
    env, environ = environment(tmp_path, channels, **variables)
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in job_overrides(argv, env, environ))


def test_values_arrive_as_the_toolkit_and_a_shell_send_them() -> None:
    argv = [
        "--amp",
        "True",
        "--test",
        "false",
        "--data.spatial_size",
        "[96,",
        "96,",
        "64]",
    ]  # split by a shell
    argv += ["--data.image_key", "['t1', 't2']", "--data.labels", "0=background,1=organ", "--ckpt_path", ""]
    argv += ["--lr", "1e-05", "--trainer.precision", "bf16-mixed", "--data.a_min", "-100"]
    assert parse_arguments(argv) == {
        "amp": True,
        "test": False,
        "data.spatial_size": [96, 96, 64],
        "data.image_key": ["t1", "t2"],
        "data.labels": {"0": "background", "1": "organ"},
        "ckpt_path": None,
        "lr": 1e-05,
        "trainer.precision": "bf16-mixed",
        "data.a_min": -100,
    }


def test_lab_hyperparameters_and_seglight_options_compose(tmp_path: Path) -> None:
    data = make_msd_dataset(tmp_path / "data", num_cases=2)
    lab = [
        "--model_name",
        "UNet",
        "--epochs",
        "10",
        "--batch_size",
        "2",
        "--lr",
        "0.0001",
        "--val_interval",
        "2",
    ]
    got = overrides_for(
        [*lab, "--amp", "false", "--loss", "dicece", "--data.spatial_size", "[32, 32, 16]"],
        tmp_path,
        {"training": data},
    )
    assert got["model"] == "unet" and got["loss"] == "dicece" and got["trainer.precision"] == "'32'"
    assert got["trainer.max_epochs"] == "10" and got["trainer.check_val_every_n_epoch"] == "2"
    assert got["optimizer.lr"] == "0.0001" and got["data.spatial_size"] == "[32, 32, 16]"
    for name in ("segresnet", "monai.networks.nets.SegResNet", "SEGRESNET"):
        assert overrides_for(["--model_name", name], tmp_path, {"training": data})["model"] == "segresnet"
    # A MONAI network without a seglight config: by class, with the default config's foreign arguments dropped.
    basic = overrides_for(
        ["--model_name", "BasicUNet", "--model.features", "[8, 8, 16, 32, 64, 8]"],
        tmp_path,
        {"training": data},
    )
    assert basic["model._target_"] == "monai.networks.nets.BasicUNet" and "~model.init_filters" in basic
    assert basic["+model.features"] == "[8, 8, 16, 32, 64, 8]"
    with pytest.raises(ConfigError, match=r"model_name=ResNet50: not a seglight model"):
        overrides_for(["--model_name", "ResNet50"], tmp_path, {"training": data})
    with pytest.raises(ConfigError, match=r"epochs and trainer.max_epochs both set"):
        overrides_for(["--epochs", "3", "--trainer.max_epochs", "4"], tmp_path, {"training": data})
    with pytest.raises(ConfigError, match=r"did you mean data.spatial_siz -> data.spatial_size\?"):
        overrides_for(["--data.spatial_siz", "[16, 16, 16]"], tmp_path, {"training": data})


def test_channel_layouts_are_detected(tmp_path: Path) -> None:
    # The lab's datalist: a JSON list with "mask" labels, paths relative to the channel.
    lab = tmp_path / "lab"
    for i in range(2):
        write_nifti(lab / "images" / f"subj_{i:03d}.nii.gz", torch.zeros(8, 8, 8).numpy())
        write_nifti(lab / "masks" / f"subj_{i:03d}.nii.gz", torch.zeros(8, 8, 8, dtype=torch.uint8).numpy())
    entries = [
        {"image": f"images/subj_{i:03d}.nii.gz", "mask": f"masks/subj_{i:03d}.nii.gz"} for i in range(2)
    ]
    (lab / "train.json").write_text(json.dumps(entries))
    (lab / "demographics.csv").write_text("subject,age\nsubj_000,61\n")  # not a datalist: no image column
    got = overrides_for([], tmp_path, {"training": lab})
    assert got["data"] == "datalist" and got["data.datalist"] == str(lab / "train.json")
    assert got["data.label_key"] == "mask" and "data.image_key" not in got
    # A dataset folder one level down (an S3 prefix that holds one dataset folder).
    nested = tmp_path / "nested"
    make_msd_dataset(nested / "Task01_Tiny", num_cases=2)
    assert overrides_for([], tmp_path, {"training": nested})["data.root"] == str(nested / "Task01_Tiny")
    # Two datalists: the hyperparameter data.datalist names one by its file name.
    (lab / "val.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"several datalists \(train.json, val.json\)"):
        overrides_for([], tmp_path, {"training": lab})
    assert overrides_for(["--data.datalist", "val.json"], tmp_path, {"training": lab})[
        "data.datalist"
    ] == str(lab / "val.json")
    # Subject folders: seglight's default file names, or two names common to every folder, one saying "seg".
    subjects = make_subject_folders(tmp_path / "subjects", ["subj_000", "subj_001"])
    got = overrides_for([], tmp_path, {"training": subjects, "validation": subjects})
    assert (got["data"], got["data.root"], got["data.val_root"]) == ("folder", str(subjects), str(subjects))
    assert "data.image_pattern" not in got
    files = {"image": "ct.nii.gz", "label": "ct_seg.nii.gz"}
    renamed = make_subject_folders(tmp_path / "renamed", ["a", "b"], files)
    got = overrides_for([], tmp_path, {"training": renamed})
    assert (got["data.image_pattern"], got["data.label_pattern"]) == ("*/ct.nii.gz", "*/ct_seg.nii.gz")
    single = tmp_path / "single"  # a validation channel with one datalist beside subject folders for training
    for folder in ("images", "masks"):
        shutil.copytree(lab / folder, single / folder)
    (single / "val.json").write_text(json.dumps(entries))
    with pytest.raises(
        ConfigError, match=r"validation channel .* holds a datalist but the training channel a folder"
    ):
        overrides_for([], tmp_path, {"training": subjects, "validation": single})
    junk = tmp_path / "junk"
    (junk / "notes").mkdir(parents=True)
    (junk / "readme.txt").write_text("x")
    with pytest.raises(
        DataError, match=rf"training channel {junk} holds nothing seglight can read \(notes/, readme.txt\)"
    ):
        overrides_for([], tmp_path, {"training": junk})
    with pytest.raises(ConfigError, match=r"no training channel"):
        overrides_for([], tmp_path, {})
    pipe = json.dumps({"training": {"TrainingInputMode": "Pipe"}})
    with pytest.raises(ConfigError, match=r"training channel: Pipe input mode"):
        overrides_for([], tmp_path, {"training": lab}, SM_INPUT_DATA_CONFIG=pipe)


def test_gpus_and_instances_select_devices_and_nodes(tmp_path: Path) -> None:
    data = make_msd_dataset(tmp_path / "data", num_cases=2)
    four = overrides_for([], tmp_path, {"training": data}, SM_NUM_GPUS="4")
    assert (four["trainer"], four["trainer.accelerator"], four["trainer.devices"]) == ("ddp", "gpu", "4")
    one = overrides_for([], tmp_path, {"training": data}, SM_NUM_GPUS="1")
    assert "trainer" not in one and one["trainer.devices"] == "1"
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "SM_NUM_GPUS": "4"}
    nodes = overrides_for([], tmp_path, {"training": data}, SM_HOSTS='["algo-1", "algo-2"]', **torchrun)
    assert (nodes["trainer"], nodes["trainer.devices"], nodes["trainer.num_nodes"]) == ("ddp", "4", "2")
    with pytest.raises(ConfigError, match=r"torch_distributed"):
        overrides_for([], tmp_path, {"training": data}, SM_HOSTS='["algo-1", "algo-2"]')


def test_under_torchrun_lightning_takes_ranks_from_torchelastic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two CPU instances, one process each, started by torchrun: this is the process of rank 1."""
    data = make_msd_dataset(tmp_path / "data", num_cases=2)
    torchrun = {"TORCHELASTIC_RUN_ID": "job", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}
    torchrun |= {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "algo-1", "MASTER_PORT": "7777"}
    env, environ = environment(tmp_path, {"training": data}, SM_HOSTS='["algo-1", "algo-2"]', **torchrun)
    overrides = [o for o in job_overrides([], env, environ) if not o.startswith("hydra.")]
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    # Building the trainer records this process's rank for Lightning's rank-zero logging: put it back after.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    with initialize_config_module(config_module="seglight.conf", version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[*overrides, "paths.output_dir=" + str(tmp_path / "run")]
        )
    trainer: L.Trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size, trainer.global_rank) == (1, 2, 2, 1)
