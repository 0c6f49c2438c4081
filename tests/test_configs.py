"""Every config in conf/ composes, with real Hydra composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seglight import compose
from seglight.build import fall_back_to_cpu

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["data", "model", "loss", "optimizer", "trainer", "callbacks", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "msd":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose(overrides, output_dir=tmp_path)
    # Resolving every interpolation catches typos in keys that only a run would hit.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["paths"]["output_dir"] == str(tmp_path.resolve())
    assert container["model"]["_target_"].startswith("monai.networks.nets.")
    assert container["optimizer"]["_partial_"] is True


def test_default_composition_is_the_reference_setup(tmp_path: Path) -> None:
    cfg = compose(output_dir=tmp_path)
    assert cfg.model._target_ == "monai.networks.nets.SegResNet"
    assert (cfg.model.init_filters, cfg.model.dropout_prob, cfg.model.out_channels) == (16, 0.2, 1)
    assert cfg.loss._target_ == "monai.losses.DiceLoss" and cfg.loss.sigmoid is True
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == pytest.approx(1e-4)
    assert (
        cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "16-mixed" and cfg.trainer.devices == 1
    )
    assert cfg.data.demo is not None and cfg.data.batch_size == 2 and cfg.data.num_workers == 4
    assert list(compose(["data=msd", "data.root=x"], output_dir=tmp_path).data.spatial_size) == [128, 128, 64]
    assert cfg.data.split_path == str(tmp_path.resolve() / "split.json")


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
