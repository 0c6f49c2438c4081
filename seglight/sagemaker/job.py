"""A SageMaker training job: hyperparameters and channels in, a seglight training run, outputs where SageMaker
collects them. ``sagemaker/train.py`` (the estimator's ``entry_point``) calls ``main``.

Where things go: the run folder (composed config, split, ``summary.json``, ``progress.png``, ``train.log``)
is ``SM_OUTPUT_DATA_DIR`` (``output.tar.gz``); checkpoints go to ``/opt/ml/checkpoints`` (synced with
``checkpoint_s3_uri``; a job that finds ``last.ckpt`` there continues from it); TensorBoard event files to
``SM_OUTPUT_DIR/tensorboard`` (``TensorBoardOutputConfig``); the model file to ``SM_MODEL_DIR``
(``model.tar.gz``). A failure exits non-zero with one line on stderr, also written as the job's failure reason.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import monai.networks.nets
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from seglight.core.errors import EXIT_USER_ERROR, ConfigError, find_user_error
from seglight.sagemaker.channels import (
    ChannelData,
    datalist_key_options,
    find_data,
    subject_pattern_options,
)
from seglight.sagemaker.environment import SageMakerEnvironment, cluster_of, write_failure
from seglight.sagemaker.hyperparameters import (
    Hyperparameters,
    check_names,
    choose_model,
    config_keys,
    lab_settings,
    network_arguments,
    override,
    parse_arguments,
    split_hyperparameters,
)
from seglight.train import train
from seglight.training.checkpoints import find_last_checkpoint

PROG = "seglight.sagemaker"
CONFIG_MODULE = "seglight.conf"
# last.ckpt is also refreshed every this many optimizer steps (and after every epoch): what a spot reclaim,
# which the training toolkit does not pass on as SIGTERM, can cost at most.
CHECKPOINT_EVERY_N_STEPS = 200
_OVERRIDE = re.compile(r"[+~]{0,2}[\w.\-/@]+(=.*)?", re.DOTALL)


def main(argv: Sequence[str] | None = None) -> None:
    """Train as the SageMaker job's hyperparameters (``--name value`` pairs) and channels say."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and all(_OVERRIDE.fullmatch(a) and not a.startswith("-") for a in argv):
        # Hydra overrides: a process that Lightning started for another GPU, with the first process's options.
        _run(argv)
        return
    env = SageMakerEnvironment.from_environ()
    with reported_failures(env):
        overrides = job_overrides(argv, env)
    print(f"{PROG}: python -m seglight.train {shlex.join(overrides)}", flush=True)
    _run(overrides)


def job_overrides(
    argv: Sequence[str], env: SageMakerEnvironment, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The Hydra overrides for this job, checked by composing them; a ConfigError or DataError if they fail.

    ``environ`` (default: this process's) tells whether torchrun started the process, and how many.
    """
    groups = config_groups()
    hp = split_hyperparameters(parse_arguments(argv), groups)
    training = env.channel("training")
    for key in ("data.datalist", "data.val_datalist"):
        # A datalist named by its file name: the file in the training channel.
        value = hp.options.get(key)
        if isinstance(value, str) and training is not None and (training / value).is_file():
            hp.options[key] = str(training / value)
    settings: dict[str, Any] = dict(hp.groups)
    model_target = None
    if "model_name" in hp.lab:
        choice = choose_model(hp.lab["model_name"], group_options("model"), monai.networks.nets)
        if choice.option is not None:
            settings["model"] = choice.option
        model_target = choice.target
    settings.update(data_settings(env, hp))
    settings.update(cluster_settings(env, hp, environ))
    # The config these group choices make: which option names exist.
    tree = OmegaConf.to_container(
        _compose([override(k, v) for k, v in settings.items() if k in groups]), resolve=False
    )
    known = config_keys(tree)
    for key in settings:
        if key not in groups and key not in known:
            raise ConfigError(f"{key}: this seglight has no such option, which the job's channels need")
    deletions: list[str] = []
    adds: set[str] = set()
    if model_target is not None:
        added, deletions = _generic_model(model_target, tree["model"], hp.options)
        settings["model._target_"] = model_target
        settings.update(added)
        adds = set(added) | {f"model.{a}" for a in network_arguments(_monai_class(model_target))[0]}
    unknown = [n for n in hp.options if n not in known and n not in adds and not n.startswith("+")]
    check_names(unknown, tree, groups)

    settings.update(output_settings(env, tree, known))
    settings.update(lab_settings(hp.lab))
    for name, value in hp.options.items():
        if name == "ckpt_path" and find_last_checkpoint(env.checkpoint_dir) is not None:
            continue  # a restarted job: its own last.ckpt, not the checkpoint it first started from
        in_config = name in known or name.startswith("+")
        settings[name if in_config else f"+{name}"] = value
    overrides = [*deletions, *(override(k, v) for k, v in settings.items())]
    _compose(overrides)  # every value checked by Hydra now, so the run cannot fail on one later
    return overrides


def data_settings(env: SageMakerEnvironment, hp: Hyperparameters) -> dict[str, Any]:
    """Data options for what the ``training`` (and ``validation``) channel holds."""
    options = hp.options
    group = hp.groups.get("data")
    if group == "demo":
        return {}
    settings: dict[str, Any] = {}
    training_layout = None
    if "data.datalist" in options or "data.root" in options:
        # The data named by hyperparameters: a datalist in the channel, or e.g. an s3:// prefix.
        datalist = options.get("data.datalist")
        settings["data"] = group or ("datalist" if datalist is not None else "msd")
        if isinstance(datalist, str) and Path(datalist).is_file():
            settings |= datalist_key_options(Path(datalist), options)
    else:
        training = env.channel("training")
        if training is None:
            raise ConfigError(
                "no training channel: start the job with estimator.fit({'training': 's3://bucket/prefix/'}), "
                "or give data.root / data.datalist as hyperparameters"
            )
        found = find_data("training", training, options)
        settings |= _source_settings(found, "data.root", "data.datalist", options, group)
        training_layout = found.layout
    validation = env.channel("validation")
    if validation is not None:
        found = find_data("validation", validation, options)
        if training_layout not in (None, found.layout):
            raise ConfigError(
                f"validation channel {validation} holds a {found.layout} but the training channel a "
                f"{training_layout}: give both in the same layout"
            )
        read_as = _source_settings(found, "data.val_root", "data.val_datalist", options, group)
        read_as.pop("data")  # the training data choose the layout; both are read with the same options
        for key, value in read_as.items():
            if key.startswith("data.val_"):
                continue
            if (key in settings and settings[key] != value) or (key not in settings and training_layout):
                raise ConfigError(
                    f"validation channel {validation} needs {key}={value}, unlike the training channel: "
                    "give both in the same layout, with the same file names or keys"
                )
        settings |= read_as
    return settings


def _source_settings(
    found: ChannelData, root_key: str, datalist_key: str, options: Mapping[str, Any], group: str | None
) -> dict[str, Any]:
    """The data group and options that read one channel's dataset (training or validation)."""
    if found.layout == "dataset":
        return {"data": group or "msd", root_key: str(found.path)}
    if found.layout == "datalist":
        keys = datalist_key_options(found.path, options)
        return {"data": group or "datalist", datalist_key: str(found.path)} | keys
    if "folder" not in group_options("data"):
        raise ConfigError(
            f"{found.path} holds subject folders, which this seglight cannot read (no data=folder); "
            "give a dataset.json or a datalist"
        )
    patterns = subject_pattern_options(found.path, options)
    return {"data": group or "folder", root_key: str(found.path)} | patterns


def cluster_settings(
    env: SageMakerEnvironment, hp: Hyperparameters, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Trainer options for the job's GPUs and instances (one process per GPU; DDP when more than one)."""
    cluster = cluster_of(env, environ)
    settings: dict[str, Any] = {}
    if "trainer" not in hp.groups:
        if cluster.distributed:
            settings["trainer"] = "ddp"
        settings["trainer.accelerator"] = cluster.accelerator
    settings["trainer.devices"] = cluster.devices
    settings["trainer.num_nodes"] = cluster.num_nodes
    return settings


def output_settings(env: SageMakerEnvironment, tree: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """Run folder, checkpoints, TensorBoard and model file where SageMaker collects them; resume from restarts."""
    settings: dict[str, Any] = {"hydra.run.dir": str(env.output_data_dir), "resume": True}
    if "callbacks.model_checkpoint.dirpath" in known:
        settings["callbacks.model_checkpoint.dirpath"] = str(env.checkpoint_dir)
    preemption = (tree.get("callbacks") or {}).get("preemption") or {}
    if "callbacks.preemption.every_n_train_steps" in known and not preemption.get("every_n_train_steps"):
        settings["callbacks.preemption.every_n_train_steps"] = CHECKPOINT_EVERY_N_STEPS
    if "logger.tensorboard.save_dir" in known:
        settings["logger.tensorboard.save_dir"] = str(env.tensorboard_dir.parent)
        settings["logger.tensorboard.name"] = env.tensorboard_dir.name
        settings["logger.tensorboard.version"] = ""
    settings["+callbacks.sagemaker_outputs"] = {
        "_target_": "seglight.training.callbacks.sagemaker_outputs.SageMakerOutputs",
        "model_dir": str(env.model_dir),
    }
    return settings


def config_groups() -> list[str]:
    """The config groups a job may choose (``data``, ``model``, ``trainer``...): folders of the config package.

    Not ``hydra`` (Hydra's own settings, which the job sets) nor ``hparams_search`` (a sweep: many runs).
    """
    return sorted(
        p.name
        for p in resources.files(CONFIG_MODULE).iterdir()
        if p.is_dir() and not p.name.startswith("_") and p.name not in ("hydra", "hparams_search")
    )


def group_options(group: str) -> list[str]:
    """The options of a config group (``model`` -> ``dynunet``, ``segresnet``, ...)."""
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


@contextmanager
def reported_failures(env: SageMakerEnvironment) -> Iterator[None]:
    """A failure inside: one line on stderr and in SageMaker's failure file; exit status 2 for user errors."""
    try:
        yield
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            lines = str(exc).strip().splitlines()
            write_failure(env.output_dir, f"{PROG}: {type(exc).__name__}: {lines[0] if lines else ''}")
            raise
        message = f"{PROG}: error: {user_error}"
        write_failure(env.output_dir, message)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


@hydra.main(version_base="1.3", config_path="pkg://seglight.conf", config_name="train")
def _app(cfg: DictConfig) -> None:
    with reported_failures(SageMakerEnvironment.from_environ()):
        train(cfg)


def _run(overrides: Sequence[str]) -> None:
    # Hydra reads the overrides from the command line; Lightning's DDP launcher passes that same command line
    # (sys.argv) on to the processes it starts for the other GPUs.
    sys.argv = [sys.argv[0], *overrides]
    _app()


def _compose(overrides: Sequence[str]) -> DictConfig:
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))
    except Exception as exc:
        raise ConfigError(f"hyperparameters: {_hydra_message(exc)}") from None


def _hydra_message(exc: Exception) -> str:
    lines = []
    for line in str(exc).splitlines():
        if line.startswith(("Config search path", "See https://")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


def _monai_class(target: str) -> type:
    return getattr(monai.networks.nets, target.rsplit(".", 1)[-1])


def _generic_model(
    target: str, model: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """(options to add, options to drop) turning the default model config into one for ``target``."""
    arguments, required = network_arguments(_monai_class(target))
    keep = set(arguments) | {"_target_"}
    deletions = [f"~model.{key}" for key in model if key not in keep]
    given = {name.split(".", 1)[1] for name in options if name.startswith("model.")}
    added: dict[str, Any] = {}
    if "spatial_dims" in arguments and "spatial_dims" not in model:
        added["+model.spatial_dims"] = 3
    missing = sorted(required - set(model) - given - {"spatial_dims"})
    if missing:
        raise ConfigError(
            f"hyperparameter model_name: {target} needs {', '.join(missing)}: give "
            f"{' and '.join(f'model.{m}' for m in missing)} as hyperparameters"
        )
    return added, deletions
