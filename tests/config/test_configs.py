"""Every config in conf/ composes, with real Hydra composition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seglight import compose
from seglight.config.builder import fall_back_to_cpu
from seglight.core.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = [
    "data",
    "model",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "hparams_search",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("msd", "nnunet", "folder"):
        overrides.append(f"data.root={tmp_path}")
    if group == "data" and option == "datalist":
        overrides.append(f"data.datalist={tmp_path / 'train.csv'}")
    cfg = compose(overrides, output_dir=tmp_path)
    # Resolving every interpolation catches typos in keys that only a run would hit.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["paths"]["output_dir"] == str(tmp_path.resolve())
    assert container["model"]["_target_"].startswith("monai.networks.nets.")
    assert container["optimizer"]["_partial_"] is True


def test_default_composition_is_the_reference_setup(tmp_path: Path) -> None:
    cfg = compose(output_dir=tmp_path)
    assert cfg.model._target_ == "monai.networks.nets.SegResNet"
    assert (cfg.model.init_filters, cfg.model.dropout_prob) == (16, 0.2)
    assert cfg.model.in_channels == cfg.model.out_channels == "auto"  # from the data: see the next test
    assert cfg.loss._target_ == "monai.losses.DiceLoss" and cfg.loss.sigmoid is True
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == pytest.approx(1e-4)
    assert (
        cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed" and cfg.trainer.devices == 1
    )
    assert cfg.data.demo is not None and cfg.data.batch_size == 2 and cfg.data.num_workers == 4
    assert list(compose(["data=msd", "data.root=x"], output_dir=tmp_path).data.spatial_size) == [128, 128, 64]
    assert cfg.data.split_path == str(tmp_path.resolve() / "split.json")


def test_default_network_built_from_the_data_is_the_reference(tmp_path: Path, cache_dir: Path) -> None:
    from seglight.config.builder import build_module

    cfg = compose(["data.demo.num_cases=3", "data.demo.shape=[16,16,8]"], output_dir=tmp_path)
    module = build_module(cfg)  # one foreground label ("organ") and one image channel in the demo data
    # seglight's switches, all off by default, sit beside the network config, not in it.
    assert module.hparams.compute == {"checkpointing": False, "channels_last": False, "compile": False}
    assert module.hparams.net == {
        "_target_": "monai.networks.nets.SegResNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "init_filters": 16,
        "dropout_prob": 0.2,
    }
    assert module.hparams.loss == {"_target_": "monai.losses.DiceLoss", "sigmoid": True}
    assert type(module.net).__name__ == "SegResNet" and 4.6e6 < module.num_parameters < 4.8e6
    assert not module.softmax and module.hparams.inference["roi_size"] is None


def test_experiment_demo_overrides_lr_and_epochs(tmp_path: Path) -> None:
    cfg = compose(["experiment=demo"], output_dir=tmp_path)
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.trainer.max_epochs < 100


def test_cpu_fallback_without_cuda(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback does not apply")
    cfg = fall_back_to_cpu({"accelerator": "gpu", "devices": 1, "precision": "16-mixed"})
    assert cfg["accelerator"] == "cpu" and cfg["precision"] == "32" and cfg["devices"] == 1
    assert any("No CUDA GPU found" in r.getMessage() for r in caplog.records)
    # trainer=ddp stays data-parallel: CPU processes over gloo (a rehearsal of a GPU run); FSDP is refused.
    ddp = fall_back_to_cpu({"accelerator": "gpu", "devices": 2, "precision": "16-mixed", "strategy": "ddp"})
    assert (ddp["accelerator"], ddp["devices"], ddp["precision"], ddp["strategy"]) == ("cpu", 2, "32", "ddp")
    with pytest.raises(ConfigError, match="trainer=fsdp needs CUDA GPUs"):
        fall_back_to_cpu({"accelerator": "gpu", "devices": 1, "strategy": "fsdp"})
    assert fall_back_to_cpu({"accelerator": "cpu", "precision": "16-mixed"})["precision"] == "32"
    assert fall_back_to_cpu({"accelerator": "cpu", "precision": "bf16-mixed"})["precision"] == "bf16-mixed"


# -- one source of truth -------------------------------------------------------------------------------------------

ENTRY_POINTS = {  # config name -> the options a user must give
    "train": [],
    "check": [],
    "predict": ["ckpt=run/checkpoints/last.ckpt", "input=scans"],
    "evaluate": ["pred=masks", "gt=labels"],
    "viz": ["image=scan.nii.gz"],
    "export": ["ckpt=run/checkpoints/last.ckpt"],
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_config_composes(name: str, tmp_path: Path) -> None:
    cfg = compose(ENTRY_POINTS[name], config_name=name, output_dir=tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["task_name"] == name


def signature_defaults(function) -> dict:
    import inspect

    return {
        k: p.default for k, p in inspect.signature(function).parameters.items() if p.default is not p.empty
    }


def same(python, yaml) -> bool:
    """Equal as plain data (tuples and lists alike, ints and floats alike)."""
    return json.loads(json.dumps(python, default=list)) == json.loads(json.dumps(yaml))


def test_python_defaults_are_the_yaml_defaults(tmp_path: Path) -> None:
    from seglight.data import SegDataModule
    from seglight.data.remote import RemoteCache
    from seglight.data.settings import DEFAULT_PATCH
    from seglight.data.transforms import deterministic_transforms
    from seglight.evaluation.scoring import evaluate
    from seglight.models.losses import DEFAULT_LOSS
    from seglight.models.networks import DEFAULT_COMPUTE, DEFAULT_NET
    from seglight.prediction.cases import predict
    from seglight.prediction.predictor import Predictor
    from seglight.training.module import DEFAULT_INFERENCE, DEFAULT_METRICS, SegModule
    from seglight.training.optim import DEFAULT_OPTIMIZER

    train = OmegaConf.to_container(compose(["data=msd"], output_dir=tmp_path))
    data = train["data"]
    checked = 0
    for key, default in signature_defaults(SegDataModule.__init__).items():
        value = data.get(key)
        if key not in data or isinstance(value, str) and ("${" in value or value == "???"):
            continue  # not in the YAML, set from other options (paths, seed), or for the user to give
        if key == "remote":  # None: RemoteCache's own defaults
            remote = RemoteCache()
            assert (remote.endpoint_url, remote.options) == (value["endpoint_url"], value["options"])
            continue
        expected = DEFAULT_PATCH if key == "patch" else default
        assert same(expected, value), f"data.{key}: Python {expected!r}, YAML {value!r}"
        checked += 1
    assert checked >= 15 and set(data) - {"_target_"} <= set(signature_defaults(SegDataModule.__init__))
    # The preprocessing's defaults are deterministic_transforms': prediction and the export JSON fill a setting a
    # checkpoint lacks from them (pipeline_settings), so the data module's must be the same.
    pipeline_defaults = signature_defaults(deterministic_transforms)
    module_defaults = signature_defaults(SegDataModule.__init__)
    shared = set(pipeline_defaults) & set(module_defaults)
    assert shared >= {"spatial_size", "a_min", "a_max", "orientation", "mode"}, shared
    for key in shared:
        assert same(pipeline_defaults[key], module_defaults[key]), f"{key}: {pipeline_defaults[key]!r}"

    net = {k: v for k, v in train["model"].items() if v != "auto"}
    assert same({k: v for k, v in DEFAULT_NET.items() if k in net}, net) and set(net) <= set(DEFAULT_NET)
    assert same(DEFAULT_LOSS, train["loss"]) and same(DEFAULT_OPTIMIZER, train["optimizer"])
    assert same(DEFAULT_INFERENCE, train["inference"]) and same(DEFAULT_METRICS, train["metrics"])
    assert same(DEFAULT_COMPUTE, train["compute"])
    assert signature_defaults(SegModule.__init__)["threshold"] == 0.5

    predict_cfg = OmegaConf.to_container(compose(ENTRY_POINTS["predict"], config_name="predict"))
    assert same(DEFAULT_INFERENCE, predict_cfg["inference"])  # one name, one meaning, in both applications
    for function in (Predictor.__init__, predict):
        defaults = signature_defaults(function)
        for key in ("tta", "device", "amp"):
            assert defaults[key] == predict_cfg[key], (function, key)
        assert defaults["largest_component"] == predict_cfg["postprocess"]["largest_component"]
    assert signature_defaults(predict)["save_probabilities"] == predict_cfg["save_probabilities"]
    evaluate_cfg = OmegaConf.to_container(compose(ENTRY_POINTS["evaluate"], config_name="evaluate"))
    for key in ("label_key", "determine_postprocessing"):
        assert signature_defaults(evaluate)[key] == evaluate_cfg[key], key


# Smaller than the YAML sizes (same classes and arguments), so that building each network stays cheap.
SMALL_MODELS = {
    "swinunetr": ["model.feature_size=12", "model.depths=[1,1,1,1]"],
    "unetr": ["model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=2", "model.feature_size=8"],
    "dynunet": ["model.filters=[8,16,32,64,128]"],
    "unet": ["model.channels=[4,8,16,32,64]"],
}


# The groups whose options are `_target_` configs (experiment and hparams_search are overlays).
TARGET_GROUPS = ["data", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger"]


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in TARGET_GROUPS for o in options(g)])
def test_every_target_config_instantiates_as_hydra_users_would(
    group: str, option: str, tmp_path: Path, cache_dir: Path
) -> None:
    import torch
    from hydra.utils import instantiate

    from seglight.config.builder import build_module
    from seglight.training.optim import scheduler_settings

    overrides = [f"{group}={option}"]
    if group != "data" or option == "demo":
        overrides += ["data.demo.num_cases=3", "data.demo.shape=[16,16,8]"]
    overrides += SMALL_MODELS.get(option, []) if group == "model" else []
    if group == "data" and option in ("msd", "nnunet", "folder"):
        overrides += [f"data.root={tmp_path}"]
    if group == "data" and option == "datalist":
        overrides += [f"data.datalist={tmp_path / 'train.csv'}"]
    cfg = compose(overrides, output_dir=tmp_path)
    if group == "model":  # `auto` values are filled from the data by seglight.build
        net = instantiate(build_module(cfg).hparams.net)
        assert isinstance(net, torch.nn.Module)
    elif group == "data":
        assert type(instantiate(cfg.data)).__name__ == "SegDataModule"
    elif group == "loss":
        assert callable(instantiate(cfg.loss))
    elif group == "optimizer":
        assert isinstance(
            instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer
        )
    elif group == "scheduler":
        if cfg.get("scheduler"):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            target, lightning_options = scheduler_settings(OmegaConf.to_container(cfg.scheduler), length=10)
            instantiate(target)(
                optimizer=optimizer
            )  # `auto` lengths filled, as SegModule.configure_optimizers does
            assert lightning_options["interval"] in ("epoch", "step")
    elif group == "trainer" and option == "fsdp" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer=fsdp needs CUDA GPUs"):  # one line, before any work
            fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
    elif group == "trainer":
        trainer_cfg = fall_back_to_cpu(OmegaConf.to_container(cfg.trainer, resolve=True))
        assert type(instantiate(trainer_cfg, logger=False)).__name__ == "Trainer"
    else:  # callbacks, logger: named entries, each a _target_ config
        for entry in (cfg.get(group) or {}).values():
            assert instantiate(entry) is not None
