"""Launcher and strategy configs: hydra/launcher=slurm composes for submitit; trainer=fsdp composes and is
refused on a machine without CUDA with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import tiny_overrides, train_in_process


def test_slurm_launcher_config_composes_one_task_per_gpu() -> None:
    overrides = [
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=lab",
        "hydra.launcher.timeout_min=720",
    ]
    with initialize_config_module(config_module="seglight.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("gpu", "lab", 720)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0  # submitit requeues
    assert "${" not in str(launcher)
    instantiate(cfg.hydra.launcher)  # the plugin accepts every setting (nothing is submitted)


def test_fsdp_composes_and_is_refused_on_the_cpu(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    with initialize_config_module(config_module="seglight.conf", version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"]
        )
    strategy = instantiate(cfg.trainer.strategy)  # MONAI blocks as units, activation checkpointing through it
    assert type(strategy).__name__ == "FSDPStrategy"
    overrides = [o for o in tiny_overrides(tmp_path / "run") if not o.startswith("hydra.")]
    assert train_in_process([*overrides, "trainer=fsdp"], tmp_path / "run") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and "trainer=fsdp needs CUDA" in lines[0] and "trainer=ddp" in lines[0]
