"""What a SageMaker training container tells the script: folders, channels, GPUs and hosts.

SageMaker's training toolkit exports them as ``SM_*`` environment variables before it starts the entry point;
without them (a script started by hand) the container's standard folders under ``/opt/ml`` are assumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from seglight.core.errors import ConfigError

BASE = Path("/opt/ml")
# SageMaker shows the first 1024 characters of this file as the job's FailureReason.
FAILURE_FILE = "failure"


@dataclass(frozen=True)
class SageMakerEnvironment:
    """The container's folders and cluster, as the training toolkit describes them."""

    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    channels: dict[str, Path] = field(default_factory=dict)
    input_modes: dict[str, str] = field(default_factory=dict)  # channel -> File | FastFile | Pipe
    num_gpus: int = 0
    hosts: tuple[str, ...] = ("algo-1",)
    current_host: str = "algo-1"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SageMakerEnvironment:
        """Read ``SM_MODEL_DIR``, ``SM_OUTPUT_DIR``, ``SM_CHANNEL_<NAME>``, ``SM_NUM_GPUS``, ``SM_HOSTS``..."""
        env = os.environ if environ is None else environ
        output_dir = Path(env.get("SM_OUTPUT_DIR", BASE / "output"))
        names = _json(env, "SM_CHANNELS", None)
        if names is None:
            names = [k[len("SM_CHANNEL_") :].lower() for k in env if k.startswith("SM_CHANNEL_")]
        channels = {
            str(name): Path(env[f"SM_CHANNEL_{str(name).upper()}"])
            for name in names
            if f"SM_CHANNEL_{str(name).upper()}" in env
        }
        input_config = _json(env, "SM_INPUT_DATA_CONFIG", {})
        input_modes = {
            str(name): str(spec.get("TrainingInputMode", "File"))
            for name, spec in (input_config.items() if isinstance(input_config, dict) else ())
            if isinstance(spec, dict)
        }
        hosts = tuple(str(h) for h in _json(env, "SM_HOSTS", ["algo-1"])) or ("algo-1",)
        try:
            num_gpus = int(env.get("SM_NUM_GPUS", "0") or 0)
        except ValueError:
            raise ConfigError(f"SM_NUM_GPUS={env['SM_NUM_GPUS']!r}: not a number") from None
        return cls(
            model_dir=Path(env.get("SM_MODEL_DIR", BASE / "model")),
            output_dir=output_dir,
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", output_dir / "data")),
            channels=channels,
            input_modes=input_modes,
            num_gpus=num_gpus,
            hosts=hosts,
            current_host=env.get("SM_CURRENT_HOST", hosts[0]),
        )

    def channel(self, name: str) -> Path | None:
        """The folder of an input channel, or None; a ConfigError for a channel streamed in Pipe mode."""
        if name not in self.channels:
            return None
        if self.input_modes.get(name) == "Pipe":
            raise ConfigError(
                f"{name} channel: Pipe input mode streams records, not files; give the channel "
                "input_mode='File' (or 'FastFile') in the estimator"
            )
        return self.channels[name]

    @property
    def checkpoint_dir(self) -> Path:
        """``/opt/ml/checkpoints``: the folder SageMaker syncs with ``checkpoint_s3_uri`` and restores on restart."""
        return self.model_dir.parent / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        """``/opt/ml/output/tensorboard``: where ``TensorBoardOutputConfig`` collects event files by default."""
        return self.output_dir / "tensorboard"


@dataclass(frozen=True)
class Cluster:
    """How many processes train, where: devices per node, nodes, and whether torchrun started them."""

    devices: int
    num_nodes: int
    accelerator: str
    torchrun: bool

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains (data-parallel)."""
        return self.devices * self.num_nodes > 1 or self.torchrun


def cluster_of(env: SageMakerEnvironment, environ: Mapping[str, str] | None = None) -> Cluster:
    """The training processes for this job: one per GPU (``SM_NUM_GPUS``) on each of ``SM_HOSTS``.

    Under ``distribution={"torch_distributed": {"enabled": True}}`` the container starts one process per GPU
    through ``torchrun``; Lightning then takes ranks from torchrun's variables (its torchelastic environment)
    and needs ``devices`` and ``num_nodes`` to match torchrun's world. Without it, one process per instance
    starts, and Lightning launches the others itself on that instance.
    """
    environ = os.environ if environ is None else environ
    accelerator = "gpu" if env.num_gpus > 0 else "cpu"
    if "TORCHELASTIC_RUN_ID" in environ:
        local = int(environ.get("LOCAL_WORLD_SIZE", max(env.num_gpus, 1)))
        world = int(environ.get("WORLD_SIZE", local * len(env.hosts)))
        if world % local:
            raise ConfigError(
                f"torchrun's WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: "
                "every instance must run the same number of processes"
            )
        return Cluster(devices=local, num_nodes=world // local, accelerator=accelerator, torchrun=True)
    if len(env.hosts) > 1:
        raise ConfigError(
            f"this job runs on {len(env.hosts)} instances ({', '.join(env.hosts)}) but was not started for "
            "distributed training: add distribution={'torch_distributed': {'enabled': True}} to the estimator "
            "(or use instance_count=1)"
        )
    return Cluster(devices=max(env.num_gpus, 1), num_nodes=1, accelerator=accelerator, torchrun=False)


def write_failure(output_dir: Path, message: str) -> None:
    """Record ``message`` as the job's failure reason (``<SM_OUTPUT_DIR>/failure``); the first one stays.

    The training toolkit writes this file itself only when it does not exist yet, and what it would write for
    a script that exits non-zero holds the exit code and command line, not the reason.
    """
    if not output_dir.is_dir():
        return  # not in a SageMaker container (or no output folder): stderr carries the message alone
    try:
        fd = os.open(output_dir / FAILURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return  # another process (a DDP rank) reported first
    with os.fdopen(fd, "w") as handle:
        handle.write(message.strip() + "\n")


def _json(env: Mapping[str, str], key: str, default: object) -> object:
    text = env.get(key)
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: not the JSON SageMaker writes") from None
