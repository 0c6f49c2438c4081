"""What a run prints and what the trackers record: `python -m seglight.train` as a log-file job (stdout a pipe), in
a terminal, and with TensorBoard, CSV, MLflow (sqlite store) and W&B (offline) as trackers."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, make_msd_dataset, tensorboard_scalars, tiny_overrides, write_nifti

pytestmark = pytest.mark.slow

NOISE = re.compile(r"Warning|warn\(|Tip:|FLOPs")
# The documented epoch line (README, "What you see while it trains").
EPOCH_LINE = re.compile(
    r"^\[[^\]]+\]\[seglight\]\[INFO\] - Epoch (\d+)/(\d+) Loss/train=\d+\.\d{4} Dice/val=\d\.\d{4}"
    r"( Dice/val/\w+=\d\.\d{4})* HD95/val=\d+\.\d{2} lr=\d\.\d{2}e[-+]\d{2} time=\S+ eta=\S+$"
)
VALIDATION_LINE = re.compile(r"^\[[^\]]+\]\[seglight\]\[INFO\] - Validation (\d+)/(\d+): \d+ cases? in \S+s$")


def train_command(run_dir: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Arguments for ``python -m seglight.train`` with the tiny run's overrides, then ``args``, as a batch job runs
    it: no stdin, the user's warning settings (none)."""
    own_data = any(a.startswith("data=") for a in args)  # another dataset than the tiny demo
    overrides = [
        o
        for o in tiny_overrides(run_dir)
        if not o.startswith("trainer.enable_")
        and not (own_data and o.startswith(("data.demo", "data.spatial")))
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MLFLOW_TRACKING_URI")}
    environment.update(SEGLIGHT_CACHE_DIR=str(cache), HYDRA_FULL_ERROR="0", **(env or {}))
    return dict(
        args=[sys.executable, "-m", "seglight.train", *overrides, *args],
        cwd=REPO,
        env=environment,
        stdin=subprocess.DEVNULL,
    )


def train(run_dir: Path, cache: Path, *args: str, env: dict[str, str] | None = None):
    """The run, with stdout and stderr to pipes (a log file, CI, SLURM, CloudWatch)."""
    command = train_command(run_dir, cache, *args, env=env)
    return subprocess.run(**command, capture_output=True, text=True, timeout=300)


@dataclass
class LogRun:
    """One tiny training run as a batch job, with every tracker at once."""

    result: subprocess.CompletedProcess
    run_dir: Path
    root: Path  # SEGLIGHT_ROOT: where the default MLflow store goes

    @property
    def lines(self) -> list[str]:
        return (self.result.stdout + self.result.stderr).splitlines()


@pytest.fixture(scope="module")
def log_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> LogRun:
    """2 epochs on an MSD dataset with one all-background case, stdout a pipe, logging to TensorBoard, CSV, MLflow
    (its default sqlite store) and W&B (offline, no account)."""
    tmp = tmp_path_factory.mktemp("log_run")
    data = make_msd_dataset(tmp / "odd", num_cases=5)
    write_nifti(data / "labelsTr" / "case_3.nii.gz", np.zeros((20, 20, 12), dtype=np.uint8))  # all background
    wandb_home = {f"WANDB_{kind}_DIR": str(tmp / "wandb" / kind) for kind in ("CONFIG", "CACHE", "DATA")}
    env = {"SEGLIGHT_ROOT": str(tmp), "WANDB_MODE": "offline", "WANDB_API_KEY": "", **wandb_home}
    msd = ["data=msd", f"data.root={data}", "data.spatial_size=[16,16,8]", "data.val_fraction=0.4"]
    loggers = "logger=[tensorboard,csv,mlflow,wandb]"
    result = train(tmp / "run", cache_dir, *msd, loggers, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return LogRun(result, tmp / "run", tmp)


def test_log_output_is_one_line_per_epoch_without_library_noise(log_run: LogRun) -> None:
    lines = log_run.lines
    assert [line for line in lines if NOISE.search(line)] == []
    epochs = [EPOCH_LINE.match(line) for line in lines if "] - Epoch " in line]
    assert all(epochs) and [m.group(1, 2) for m in epochs] == [("1", "2"), ("2", "2")], lines
    validations = [VALIDATION_LINE.match(line) for line in lines if "] - Validation " in line]
    assert all(validations) and len(validations) == 2, lines
    assert not any("━" in line or "it/s" in line for line in lines), "no progress bar in a log"
    # The odd case is still reported, once.
    odd = [line for line in lines if "case_3" in line and "all background" in line]
    assert len(odd) == 1 and "[WARNING]" in odd[0]
    # The same lines are in the run's log file.
    log_lines = (log_run.run_dir / "train.log").read_text().splitlines()
    assert sum(bool(EPOCH_LINE.match(line)) for line in log_lines) == 2


def test_tensorboard_and_csv_have_the_same_metrics_and_the_hparams_session(log_run: LogRun) -> None:
    curves = tensorboard_scalars(log_run.run_dir)
    (metrics_csv,) = (log_run.run_dir / "csv").glob("version_*/metrics.csv")
    with metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) - {"step"} == set(curves)
    assert {"Loss/train", "Dice/val", "Dice/val/cube", "HD95/val", "Dice/val_best"} <= set(curves)
    best = [v for _, v in curves["Dice/val_best"]]
    assert best[-1] == pytest.approx(max(v for _, v in curves["Dice/val"]))
    assert [s for s, _ in curves["Dice/val_best"]] == [s for s, _ in curves["Dice/val"]]

    # TensorBoard's HParams plugin sees the run's settings (read with TensorBoard's own reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(log_run.run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content  # TensorBoard builds the table from every run's session
    session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    settings = {k: v.string_value or v.number_value for k, v in session.hparams.items()}
    assert settings["model"] == "segresnet" and settings["loss"] == "dice" and settings["data"] == "msd"
    assert settings["optimizer.lr"] == pytest.approx(1e-4) and settings["data.spatial_size"] == "16x16x8"
    assert settings["model.init_filters"] == 8 and settings["data.val_fraction"] == pytest.approx(0.4)


def test_mlflow_sqlite_store_holds_params_dice_history_and_best_checkpoint(log_run: LogRun) -> None:
    from mlflow.tracking import MlflowClient

    store = log_run.root / "outputs" / "mlflow"  # the default: a sqlite store under the outputs folder
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("seglight").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["optimizer.lr"] == "0.0001" and params["data.batch_size"] == "2"
    assert params["model.out_channels"] == "1"  # the network as built, not "auto"
    assert not any(key.startswith("net/") for key in params)  # no second copy from Lightning
    curves = tensorboard_scalars(log_run.run_dir)
    history = client.get_metric_history(run.info.run_id, "Dice/val")
    assert [m.value for m in history] == pytest.approx([v for _, v in curves["Dice/val"]])
    assert set(run.data.metrics) == set(curves)

    best = Path(json.loads((log_run.run_dir / "summary.json").read_text())["best_checkpoint"])
    logged = [a.path for a in client.list_artifacts(run.info.run_id, best.stem)]
    assert f"{best.stem}/{best.name}" in logged
    assert (store / "artifacts").is_dir() and not (REPO / "mlruns").exists()


def test_wandb_offline_run_holds_metrics_config_and_checkpoint(log_run: LogRun) -> None:
    (run_file,) = (log_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert any(f"wandb sync {run_file.parent}" in line for line in log_run.lines)
    history, config, artifacts = {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(
                    json.loads(item.value_json)
                )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "artifact":
            artifacts.append((record.artifact.type, [m.path for m in record.artifact.manifest.contents]))
    curves = tensorboard_scalars(log_run.run_dir)
    assert history["Dice/val"] == pytest.approx([v for _, v in curves["Dice/val"]])
    assert {name for name in history if not name.startswith(("_", "trainer/"))} == set(curves)
    assert config["optimizer"]["lr"] == pytest.approx(1e-4) and config["model"]["out_channels"] == 1
    assert ("model", ["model.ckpt"]) in artifacts


def test_terminal_shows_the_progress_bar_and_keeps_epoch_lines_for_the_log_file(
    tmp_path: Path, cache_dir: Path
) -> None:
    import pty

    run_dir = tmp_path / "run"
    parent, child = pty.openpty()  # stdout is a terminal; stderr stays a pipe
    command = train_command(run_dir, cache_dir, "trainer.max_epochs=1", "logger=none", "hydra.verbose=true")
    process = subprocess.Popen(**command, stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    chunks = []
    while True:  # read while it runs: a full terminal buffer would block the progress bar's writes
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    stderr = process.stderr.read().decode(errors="replace")
    assert process.wait(timeout=300) == 0, stderr[-3000:]
    screen = b"".join(chunks).decode(errors="replace")
    assert "Dice/val" in screen and "Loss/train" in screen and "Epoch 0/0" in screen  # Lightning's bar
    assert not re.search(r"\] - Epoch 1/1 Loss/train=", screen)
    assert sum(bool(EPOCH_LINE.match(line)) for line in (run_dir / "train.log").read_text().splitlines()) == 1
    # hydra.verbose=true shows what is otherwise filtered, each distinct warning once.
    shown = (screen + stderr).splitlines()
    assert sum("always_return_as_numpy" in line for line in shown) == 1
    assert sum("LeafSpec" in line for line in shown) == 1


def wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte W&B header, then a LevelDB log (32 KiB blocks of chunks with a
    7-byte header: checksum, length, type) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # a whole record
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == 2:  # first, middle, last pieces of a record
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)


def test_missing_tracker_is_one_line_naming_the_extra_and_exit_2(tmp_path: Path, cache_dir: Path) -> None:
    # mlflow made unimportable in the child process, as on a machine without the extra.
    code = (
        "import runpy, sys; sys.modules['mlflow'] = None; "
        f"sys.argv = ['seglight.train', 'logger=mlflow', 'hydra.run.dir={tmp_path / 'run'}']; "
        "runpy.run_module('seglight.train', run_name='__main__')"
    )
    env = {**os.environ, "SEGLIGHT_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "seglight.train: error: logger=mlflow needs the mlflow package, which is not installed: "
        'pip install "seglight[mlflow]"'
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_logger_group_takes_several_trackers_at_once() -> None:
    from seglight import compose

    cfg = compose(["logger=[tensorboard,csv,mlflow,wandb]"], output_dir="/tmp/unused")
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow", "wandb"]
    assert cfg.logger.mlflow._target_ == "seglight.training.trackers.mlflow_logger"


def test_progress_bar_follows_the_stream_unless_set() -> None:
    from seglight.config.builder import trainer_output
    from seglight.training.callbacks.epoch_log import EpochLog
    from seglight.training.callbacks.model_summary import ModelSummary

    # pytest captures stdout: not a terminal.
    cfg, callbacks = trainer_output({"enable_progress_bar": None, "enable_model_summary": True}, [])
    assert cfg["enable_progress_bar"] is False and cfg["enable_model_summary"] is False
    (log,) = [c for c in callbacks if isinstance(c, EpochLog)]
    assert log.console and any(isinstance(c, ModelSummary) for c in callbacks)
    cfg, callbacks = trainer_output({"enable_progress_bar": True, "enable_model_summary": False}, [])
    assert cfg["enable_progress_bar"] is True and not any(isinstance(c, ModelSummary) for c in callbacks)
    assert not [c for c in callbacks if isinstance(c, EpochLog)][0].console  # lines go to the log file only


def test_wandb_goes_offline_without_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seglight.training.trackers import wandb_credentials_found

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login a password b\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_credentials_found()
    netrc.write_text("machine api.wandb.ai login user password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_credentials_found()


def test_check_prints_its_report_without_library_start_up_chatter(tmp_path: Path, cache_dir: Path) -> None:
    data = [o for o in tiny_overrides(tmp_path / "run") if o.startswith("data.demo")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-m", "seglight.check", *data, f"hydra.run.dir={tmp_path / 'check'}"],
        cwd=REPO,
        env={**env, "SEGLIGHT_CACHE_DIR": str(cache_dir)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert lines[0].startswith("Dataset check (every voxel): 6 cases"), lines[:5]
    assert [line for line in lines if NOISE.search(line) or "setup plugin" in line] == []


def test_sagemaker_mlflow_arn_without_its_plugin_names_it(tmp_path: Path) -> None:
    import importlib.util

    from seglight.core.errors import ConfigError
    from seglight.training.trackers import build_loggers

    if importlib.util.find_spec("sagemaker_mlflow") is not None:
        pytest.skip("the sagemaker-mlflow plugin is installed here")
    arn = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/lab"
    entry = {
        "_target_": "seglight.training.trackers.mlflow_logger",
        "tracking_uri": arn,
        "save_dir": str(tmp_path),
    }
    with pytest.raises(ConfigError, match="pip install .*sagemaker-mlflow"):
        build_loggers({"mlflow": entry})


# What seglight's API runs in a notebook cell, as a script: compose, build, fit one tiny epoch.
API_SCRIPT = """
from seglight import build, compose
overrides = {overrides!r}
datamodule, module, trainer = build(compose(overrides, output_dir={run!r}))
{fit}
"""
LIGHTNING_START_UP = re.compile(r"GPU available: False|TPU available|Tip:")


def run_api(
    run_dir: Path, cache: Path, fit: bool = True, before: str = "", after: str = "", env: dict | None = None
) -> subprocess.CompletedProcess:
    """``API_SCRIPT`` between ``before`` and ``after`` in a fresh ``python -c``, stdout and stderr captured, with
    no warning settings of the user's."""
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith("hydra.")] + ["trainer.max_epochs=1"]
    fit_line = "trainer.fit(module, datamodule=datamodule)" if fit else ""
    script = before + API_SCRIPT.format(overrides=overrides, run=str(run_dir), fit=fit_line) + after
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "SEGLIGHT_VERBOSE")}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=run_dir.parent,
        env={**environment, "SEGLIGHT_CACHE_DIR": str(cache), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_api_in_a_notebook_prints_what_the_commands_print(tmp_path: Path, cache_dir: Path) -> None:
    result = run_api(tmp_path / "run", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert [line for line in lines if LIGHTNING_START_UP.search(line) or NOISE.search(line)] == []
    # seglight's own lines, as the commands show them, and nothing on stderr.
    assert sum(bool(EPOCH_LINE.match(line)) for line in result.stdout.splitlines()) == 1, lines
    assert result.stderr == ""


def test_the_api_keeps_the_users_logging_and_only_filters_it(tmp_path: Path, cache_dir: Path) -> None:
    own = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='mine: %(name)s: %(message)s', stream=sys.stderr)\n"
    )
    handlers = "print('root handlers:', [type(h).__name__ for h in logging.getLogger().handlers])\n"
    result = run_api(tmp_path / "run", cache_dir, before=own, after=handlers)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if LIGHTNING_START_UP.search(line)] == []
    assert any(line.startswith("mine: seglight: Epoch 1/1 ") for line in result.stderr.splitlines())
    assert "root handlers: ['StreamHandler']" in result.stdout  # the user's own, and no other

    # SEGLIGHT_VERBOSE=1 shows everything, as it does for the commands.
    verbose = run_api(tmp_path / "verbose", cache_dir, fit=False, env={"SEGLIGHT_VERBOSE": "1"})
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "TPU available" in verbose.stdout + verbose.stderr
