"""Every config in conf/ composes, with real Hydra composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seglight import compose
from seglight.builder import fall_back_to_cpu

CONF = Path(__file__).resolve().parents[1] / "conf"
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
    if group == "data" and option in ("msd", "nnunet"):
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
    from seglight.builder import build_module

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
    cfg = fall_back_to_cpu({"accelerator": "gpu", "devices": 1, "precision": "16-mixed", "strategy": "ddp"})
    assert cfg["accelerator"] == "cpu" and cfg["precision"] == "32" and "strategy" not in cfg
    assert any("No CUDA GPU found" in r.getMessage() for r in caplog.records)
    assert fall_back_to_cpu({"accelerator": "cpu", "precision": "16-mixed"})["precision"] == "32"
    assert fall_back_to_cpu({"accelerator": "cpu", "precision": "bf16-mixed"})["precision"] == "bf16-mixed"
