"""Experiment trackers: the ``logger`` config group (TensorBoard, CSV, MLflow, W&B, several at once), the run's
settings as hyperparameters, the best Dice for comparing runs, and checkpoints as tracker artifacts."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import netrc
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from seglight.core.console import wants_everything
from seglight.core.errors import ConfigError, DiskFullError, SeglightError
from seglight.core.internals import tensorboard_file_writer, wandb_init_arguments
from seglight.core.io import disk_full_error, free_bytes
from seglight.data.caching.datasets import nbytes
from seglight.training.checkpoints import checkpoint_dir

log = logging.getLogger("seglight")

# A tracker's name in a logger's _target_ -> (the module it needs, how to install it).
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "mlflow": ("mlflow", 'pip install "seglight[mlflow]"'),
    "wandb": ("wandb", 'pip install "seglight[wandb]"'),
    "comet": ("comet_ml", "pip install comet-ml"),
    "neptune": ("neptune", "pip install neptune"),
}
BEST_DICE = "Dice/val_best"
# Shown in TensorBoard's HParams tab for every run (when set), besides every option given on the command line.
MAIN_SETTINGS = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "data.batch_size",
    "data.mode",
    "data.spatial_size",
    "data.patch_size",
    "data.patch.size",
    "data.target_spacing",
    "data.patch.target_spacing",
    "data.fold",
    "seed",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
)
# Sizes that only one data.mode uses: spatial_size (resize), the others (patch).
SIZE_SETTINGS = (
    "data.spatial_size",
    "data.patch_size",
    "data.patch.size",
    "data.target_spacing",
    "data.patch.target_spacing",
)
# Config groups whose chosen option names the run's setup (model=unet, loss=dicece, ...).
MAIN_GROUPS = ("experiment", "data", "model", "loss", "optimizer", "scheduler", "trainer")


def build_loggers(loggers_cfg: Mapping[str, Any] | None) -> list[Logger]:
    """The configured loggers (``cfg.logger``: one entry per tracker); a tracker whose package is missing is a
    ConfigError that names what to install."""
    loggers: list[Logger] = []
    for name, entry in (loggers_cfg or {}).items():
        if not entry or "_target_" not in entry:
            continue
        require_tracker_package(name, str(entry["_target_"]))
        try:
            loggers.append(instantiate(entry))
        except Exception as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, SeglightError):
                raise cause from None
            raise ConfigError(f"logger.{name}: {cause}") from exc
    return loggers


def require_tracker_package(name: str, target: str) -> None:
    """ConfigError naming the pip command when the tracker that ``target`` uses is not installed."""
    lowered = f"{name} {target}".lower()
    for key, (module, install) in TRACKER_PACKAGES.items():
        if key not in lowered:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"logger={name} needs the {module} package, which is not installed: {install}"
            ) from None


# -- MLflow ------------------------------------------------------------------------------------------------------


def mlflow_logger(
    experiment_name: str = "seglight",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    save_dir: str | Path = "outputs/mlflow",
    artifact_location: str | None = None,
    log_model: bool | str = True,
    tags: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
) -> Logger:
    """Lightning's MLFlowLogger, with a tracking store that works without a server.

    The store is ``tracking_uri``, else ``MLFLOW_TRACKING_URI`` (a server, Databricks, SageMaker's managed MLflow
    by its ARN with the ``sagemaker-mlflow`` plugin), else a sqlite database ``<save_dir>/mlflow.db`` shared by
    all runs, whose artifacts go to ``<save_dir>/artifacts``. ``log_model=True`` uploads the best (and last)
    checkpoint at the end of training.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        folder = Path(save_dir).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    if uri.startswith("arn:") and importlib.util.find_spec("sagemaker_mlflow") is None:
        raise ConfigError(
            f"logger=mlflow: the tracking URI {uri} is a SageMaker MLflow tracking server, which needs its "
            'plugin: pip install "seglight[mlflow]" sagemaker-mlflow'
        )
    if artifact_location is None and uri.startswith("sqlite:///"):
        # MLflow would put a local store's artifacts in ./mlruns of whatever folder the run was started from.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    all_tags = {"seglight.output_dir": str(output_dir)} if output_dir else {}
    all_tags.update(dict(tags or {}))
    log.info("MLflow: experiment '%s' at %s", experiment_name, uri)
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name or run_name_of(output_dir),
        tracking_uri=uri,
        tags=all_tags or None,
        artifact_location=artifact_location,
        log_model=log_model,
    )


def run_name_of(output_dir: str | Path | None) -> str | None:
    """A tracker run name from the run folder: its name, with the sweep folder's for a sweep job (``.../3``)."""
    if not output_dir:
        return None
    path = Path(output_dir)
    return f"{path.parent.name}/{path.name}" if path.name.isdigit() else path.name


# -- Weights & Biases --------------------------------------------------------------------------------------------


def wandb_logger(
    project: str = "seglight",
    name: str | None = None,
    save_dir: str | Path = ".",
    mode: str | None = None,
    log_model: bool | str = True,
    output_dir: str | Path | None = None,
    **kwargs: Any,
) -> Logger:
    """Lightning's WandbLogger; offline into ``<save_dir>/wandb`` when there is no W&B account to log to.

    ``mode`` (online, offline, disabled) defaults to ``WANDB_MODE``, else online when W&B credentials are found
    (``WANDB_API_KEY``, or ``wandb login``'s netrc entry), else offline: a run never stops at a login prompt, and
    ``wandb sync <save_dir>/wandb/offline-run-*`` uploads it later. ``log_model=True`` logs the best (and last)
    checkpoint as a model artifact at the end of training (offline too, uploaded on sync).
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or None
    if mode is None:
        mode = "online" if wandb_credentials_found() else "offline"
        if mode == "offline":
            log.info(
                "W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline into %s; upload later with "
                "`wandb sync`",
                Path(save_dir) / "wandb",
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if "settings" not in kwargs and not wants_everything():
        import wandb

        # W&B's banner and its end-of-run panel (colour codes included where the output is a log file); the
        # offline folder and the sync command are still printed.
        kwargs["settings"] = wandb.Settings(quiet=True)
    logger = WandbLogger(
        project=project,
        name=name or run_name_of(output_dir),
        save_dir=str(save_dir),
        log_model=log_model,
        mode=mode,
        **kwargs,
    )
    init_arguments = wandb_init_arguments(logger)
    if init_arguments is not None and init_arguments.get("anonymous") is None:
        # Lightning passes anonymous=None, which W&B now answers with a deprecation notice on every run.
        init_arguments.pop("anonymous", None)
    return logger


def wandb_credentials_found() -> bool:
    """Whether W&B could log in without asking: an API key in the environment or in the netrc file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# -- what every tracker records ------------------------------------------------------------------------------------


def config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain containers, interpolations resolved (those that cannot be stay as text)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation that only resolves inside a Hydra run
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1e-4}}`` -> ``{"optimizer.lr": 1e-4}``: the names the command line uses."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_settings(cfg: DictConfig) -> dict[str, str | int | float | bool]:
    """The settings that tell a run from its neighbours: the chosen options of the main config groups, the main
    numbers (``MAIN_SETTINGS``) and every key given on the command line; scalars only, for TensorBoard."""
    choices, overridden = _hydra_choices_and_overrides()
    settings: dict[str, Any] = {}
    for group in MAIN_GROUPS:
        choice = choices.get(group)
        if choice is None and isinstance(cfg.get(group), Mapping | DictConfig):
            target = cfg[group].get("_target_")
            choice = str(target).rsplit(".", 1)[-1] if target else None
        if choice is not None:
            settings[group] = choice
    patch_mode = OmegaConf.select(cfg, "data.mode", default=None) == "patch"
    for key in (*MAIN_SETTINGS, *overridden):
        if key in SIZE_SETTINGS and (key != "data.spatial_size") != patch_mode:
            continue  # the sizes of the other data.mode: unused
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if value is not None and not isinstance(value, Mapping | DictConfig):
            settings[key] = value
    return {key: _scalar(value) for key, value in settings.items()}


def _hydra_choices_and_overrides() -> tuple[dict[str, str], list[str]]:
    """(config group -> chosen option, keys set on the command line) of this Hydra job; empty outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, []
    hydra_cfg = HydraConfig.get()
    choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items() if v is not None}
    keys = []
    for override in hydra_cfg.overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("hydra") and key not in choices:
            keys.append(key)
    return choices, keys


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, bool | int | float | str):
        return value
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        return "x".join(f"{v:g}" for v in value)  # 128x128x64, 1.5x1.5x2
    return str(value)


def finish_trackers(trainer: L.Trainer) -> None:
    """Close the tracker runs that Lightning leaves open after ``fit`` (W&B), saying where an offline run is.

    Lightning keeps a W&B run open for later ``fit``/``test`` calls; left to the end of the process, W&B closes it
    with a banner of its own.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        run = logger.experiment
        if getattr(run, "offline", False):
            folder = Path(run.dir).parent
            log.info("W&B: offline run in %s; upload it with: wandb sync %s", folder, folder)
        elif getattr(run, "url", None):
            log.info("W&B: %s", run.url)
        run.finish()


def write_hparams_session(logger: TensorBoardLogger, settings: Mapping[str, Any]) -> None:
    """Record ``settings`` as this run's session in TensorBoard's HParams plugin.

    Only the session's start is written, not an experiment summary: TensorBoard then builds the table from every
    run's session (columns the union of their settings; metrics every scalar of the runs, ``Dice/val_best``
    among them), where one run's experiment summary would define the columns for all.
    """
    from torch.utils.tensorboard.summary import hparams

    _, session_start, _ = hparams(dict(settings), {BEST_DICE: 0.0})
    # Lightning's TensorBoardLogger writes its own hparams summaries through the same writer.
    tensorboard_file_writer(logger).add_summary(session_start)
    logger.experiment.flush()


def is_mlflow(logger: Logger) -> bool:
    return type(logger).__name__ == "MLFlowLogger"


# -- after a kill or a full disk ---------------------------------------------------------------------------------

EVENT_FILES = "events.out.tfevents.*"
CSV_METRICS = "metrics.csv"


def repair_tracker_files(folder: str | Path) -> list[Path]:
    """Cut what a killed run left half-written at the end of its tracker files; returns the files cut.

    TensorBoard's event files and the CSV logger's ``metrics.csv`` grow by appending: a SIGKILL or a full disk can
    stop a write inside a record, which TensorBoard then reports as data loss and CSV readers as a broken row.
    Each file is cut after its last whole record, so the resumed run's records follow whole ones.
    """
    repaired = []
    for path in sorted(Path(folder).rglob(EVENT_FILES)):
        if path.is_file() and _cut(path, _whole_event_records(path)):
            repaired.append(path)
    for path in sorted(Path(folder).rglob(CSV_METRICS)):
        data = path.read_bytes() if path.is_file() else b"\n"
        if data and not data.endswith(b"\n") and _cut(path, data.rfind(b"\n") + 1):
            repaired.append(path)
    for path in repaired:
        log.info("%s: cut a record that a stopped run left half-written at its end", path)
    return repaired


def repair_run_trackers(trainer: L.Trainer) -> list[Path]:
    """``repair_tracker_files`` in the folder of each of the run's trackers (all its sessions' files)."""
    folders = {getattr(lg, "root_dir", None) or getattr(lg, "log_dir", None) for lg in trainer.loggers}
    return [path for folder in sorted(str(f) for f in folders if f) for path in repair_tracker_files(folder)]


def _whole_event_records(path: Path) -> int:
    """The length of the whole TFRecords at the start of an event file (length, its CRC, data, the data's CRC)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    offset = last = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        if struct.unpack("<I", data[offset + 8 : offset + 12])[0] != masked_crc32c(header):
            break
        end = offset + 12 + struct.unpack("<Q", header)[0] + 4
        if end > len(data):
            break
        offset, last = end, offset
    if (
        offset > 0
    ):  # a kill cuts the tail: the data's CRC is checked for the last record only (CRCs cost here)
        length = offset - last - 16
        body = data[last + 12 : last + 12 + length]
        if struct.unpack("<I", data[offset - 4 : offset])[0] != masked_crc32c(body):
            offset = last
    return offset


def _cut(path: Path, length: int) -> bool:
    if length >= path.stat().st_size:
        return False
    with open(path, "r+b") as handle:
        handle.truncate(length)
    return True


def run_disk_full(trainer: L.Trainer, exc: BaseException) -> DiskFullError:
    """The one message for a training run whose disk filled up outside a checkpoint write (tracker files, logs).

    It names the run's folder with the least space left (the one that filled) and the space the run needs to go
    on: about one checkpoint.
    """
    filename = getattr(exc, "filename", None) or getattr(exc.__context__ or exc.__cause__, "filename", None)
    folders = [Path(filename).parent] if filename else []
    folders += [Path(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)]
    folders += [checkpoint_dir(trainer), Path(trainer.default_root_dir)]
    folder = min(folders, key=lambda f: free_bytes(f) if free_bytes(f) is not None else float("inf"))
    checkpoints = checkpoint_dir(trainer)
    sizes = [p.stat().st_size for p in checkpoints.glob("*.ckpt")] if checkpoints.is_dir() else []
    if not sizes and trainer.lightning_module is not None:
        # No checkpoint yet: the weights and, with Adam, two moments of each.
        sizes = [3 * nbytes(dict(trainer.lightning_module.state_dict()))]
    return disk_full_error(
        folder,
        max(sizes, default=0),
        "the run's next checkpoint",
        advice="free some space there, then continue with resume=true",
    )
