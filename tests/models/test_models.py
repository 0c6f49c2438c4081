"""The model zoo in conf/model: each builds from the data's channel and class counts and trains on the CPU;
size constraints and contradicting settings fail at start with one clear message; DynUNet's nnU-Net plan;
the memory and speed switches; optimisers and schedules."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from seglight import SegModule, compose
from seglight.config.builder import build_module
from seglight.core.errors import ConfigError
from seglight.models.networks import dynunet_kernels_strides, enable_activation_checkpointing
from tests.helpers import train_in_process

CONF = Path(__file__).resolve().parents[2] / "conf"
# Small versions of each network and the smallest size it accepts, so a CPU step takes about a second.
TINY = {
    "segresnet": (["model.init_filters=8"], [16, 16, 16]),
    "unet": (["model.channels=[4,8,16,16,16]"], [32, 32, 32]),
    "swinunetr": (["model.feature_size=12", "model.depths=[1,1,1,1]"], [32, 32, 64]),
    "dynunet": (["model.filters=[8,16,32]"], [16, 16, 16]),
    "unetr": (
        ["model.feature_size=8", "model.hidden_size=48", "model.num_heads=4", "model.mlp_dim=96"],
        [16] * 3,
    ),
}


def demo_overrides(num_labels: int = 1, size: list[int] = (16, 16, 16)) -> list[str]:
    return [
        "data.demo.num_cases=3",
        "data.demo.shape=[20,20,16]",
        "data.demo.spacing=[1.0,1.0,1.0]",
        f"data.demo.num_labels={num_labels}",
        f"data.spatial_size=[{','.join(map(str, size))}]",
        "data.num_workers=0",
    ]


def test_every_model_config_has_a_tiny_setting() -> None:
    assert sorted(TINY) == sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("num_labels", [1, 2], ids=["binary", "multiclass"])
@pytest.mark.parametrize("model", sorted(TINY))
def test_model_builds_from_the_data_and_trains_a_step(
    model: str, num_labels: int, tmp_path: Path, cache_dir: Path
) -> None:
    overrides, size = TINY[model]
    cfg = compose([f"model={model}", *overrides, *demo_overrides(num_labels, size)], output_dir=tmp_path)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg, datamodule)

    # Channel and class counts come from the data: 1 CT channel; 1 sigmoid output or 3 softmax outputs.
    assert module.hparams.net["in_channels"] == 1
    assert module.hparams.net["out_channels"] == (1 if num_labels == 1 else 3)
    assert module.softmax is (num_labels == 2)
    loss = module.hparams.loss
    assert (loss.get("softmax"), loss.get("to_onehot_y"), loss.get("sigmoid")) == (
        (True, True, None) if num_labels == 2 else (None, None, True)
    )

    torch.manual_seed(0)
    image = torch.rand(1, 1, *size)
    label = torch.randint(0, num_labels + 1, (1, 1, *size)).float()
    module.train()
    logits = module(image)
    assert logits.shape == (1, module.hparams.net["out_channels"], *size)
    loss_value = module.loss_fn(logits, label)
    loss_value.backward()
    assert torch.isfinite(loss_value)
    params = [p for p in module.net.parameters() if p.requires_grad]
    with_grad = [p for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    # (UNETR's ViT keeps a classification head that segmentation never uses.)
    assert sum(p.numel() for p in with_grad) > 0.9 * sum(p.numel() for p in params)
    assert module.labels(module.probabilities(logits)).max() <= num_labels


def test_any_monai_network_by_target(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose(
        [
            "model._target_=monai.networks.nets.BasicUNet",
            "~model.init_filters",
            "~model.dropout_prob",
            "+model.features=[4,4,8,8,16,4]",
            *demo_overrides(2),
        ],
        output_dir=tmp_path,
    )
    module = build_module(cfg).eval()
    assert type(module.net).__name__ == "BasicUNet" and module.hparams.net["out_channels"] == 3
    with torch.no_grad():
        assert module(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_dynunet_plan_follows_nnunet_rules_for_anisotropic_spacing() -> None:
    # Worked out by hand for a 128 x 128 x 32 patch at 0.8 x 0.8 x 2.5 mm:
    #  z is more than twice as coarse: first stage halves x, y only, with 3x3x1 kernels (-> 1.6, 1.6, 2.5 mm);
    #  then all axes halve while they have >= 8 voxels: 64,64,32 -> 32,32,16 -> 16,16,8 -> 8,8,4;
    #  z (4 voxels) stops, x and y halve once more -> 4,4,4; six stages is the cap.
    kernels, strides = dynunet_kernels_strides([128, 128, 32], [0.8, 0.8, 2.5])
    assert strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    # Isotropic 32^3: 32 -> 16 -> 8 -> 4, four stages of 3x3x3.
    assert dynunet_kernels_strides([32, 32, 32], [1.0, 1.0, 1.0]) == (
        [[3, 3, 3]] * 4,
        [[1, 1, 1]] + [[2, 2, 2]] * 3,
    )


def test_dynunet_config_is_planned_from_patch_size_and_target_spacing(
    tmp_path: Path, cache_dir: Path
) -> None:
    cfg = compose(
        [
            "model=dynunet",
            "model.filters=null",
            "data.mode=patch",
            "data.patch.size=[64,64,16]",
            "data.patch.target_spacing=[0.8,0.8,2.5]",
            *demo_overrides(),
        ],
        output_dir=tmp_path,
    )
    net = build_module(cfg).hparams.net
    assert net["strides"] == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert net["kernel_size"][0] == [3, 3, 1] and net["upsample_kernel_size"] == net["strides"][1:]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["model=swinunetr", "data.spatial_size=[100,100,50]"],
            ["data.spatial_size=[100, 100, 50] does not suit SwinUNETR", "multiple of 32", "[96, 96, 64]"],
        ),
        (
            ["model=swinunetr", "data.mode=patch", "data.patch.size=[100,100,50]"],
            ["data.patch.size=[100, 100, 50] does not suit SwinUNETR", "data.patch.size=[96, 96, 64]"],
        ),
        (["model=swinunetr", "data.spatial_size=[32,32,32]"], ["too small for SwinUNETR"]),
        (["model=unetr", "data.spatial_size=[40,40,40]"], ["UNETR", "multiple of 16", "[48, 48, 48]"]),
        (["model=unet", "data.spatial_size=[20,20,20]"], ["UNet", "multiple of 16", "[16, 16, 16]"]),
        (["model=segresnet", "data.spatial_size=[30,30,30]"], ["SegResNet", "multiple of 8", "[32, 32, 32]"]),
        (["model=unetr", "model.img_size=[32,32,32]"], ["model.img_size", "img_size=auto"]),
        (["model=dynunet", "model.filters=[8,16]"], ["model.filters has 2 entries", "3 stages"]),
        (["model.in_channels=2"], ["model.in_channels=2", "1 channel"]),
        (
            ["model.out_channels=2", "data.demo.num_labels=2"],
            ["more classes in the labels", "out_channels=3"],
        ),
        (["model.out_channels=4", "data.demo.num_labels=2"], ["3 classes (0 background, 1 organ, 2 cyst)"]),
    ],
)
def test_bad_combinations_fail_at_start_with_one_message(
    overrides: list[str], needles: list[str], tmp_path: Path, cache_dir: Path
) -> None:
    base = demo_overrides()
    cfg = compose([*base, *overrides], output_dir=tmp_path)
    with pytest.raises(ConfigError) as error:
        build_module(cfg)
    for needle in needles:
        assert needle in str(error.value)


def test_swinunetr_with_100x100x50_ends_the_run_with_one_line(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    status = train_in_process(["model=swinunetr", *demo_overrides(), "data.spatial_size=[100,100,50]"], run)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        "seglight.train: error: data.spatial_size=[100, 100, 50] does not suit SwinUNETR: every size must be a "
        "multiple of 32; use e.g. data.spatial_size=[96, 96, 64]"
    ]
    assert not (run / "checkpoints").exists()


def test_label_values_must_be_consecutive() -> None:
    from seglight.models.networks import output_channels

    assert output_channels({0: "background", 1: "organ"}) == 1
    assert output_channels({0: "background", 1: "organ", 2: "cyst"}) == 3
    with pytest.raises(ConfigError, match=r"labels \(0 background, 2 tumour\) are not consecutive"):
        output_channels({0: "background", 2: "tumour"})


def test_binary_data_may_use_two_softmax_channels(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose(["model.init_filters=8", "model.out_channels=2", *demo_overrides()], output_dir=tmp_path)
    module = build_module(cfg)
    assert module.softmax and module.num_classes == 2 and module.class_names == ["organ"]


# -- memory and speed switches ----------------------------------------------------------------------------------


def saved_activation_bytes(module: SegModule, image: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward pass of one training step, and the resulting gradients."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    module.train()
    module.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(image)
    out.float().mean().backward()
    return total, [p.grad.clone() for p in module.net.parameters()]


@pytest.mark.parametrize(
    "net",
    [
        {
            "_target_": "monai.networks.nets.SegResNet",
            "init_filters": 8,
            "blocks_down": [1, 2, 2],
            "blocks_up": [1, 1],
        },
        {
            "_target_": "monai.networks.nets.UNet",
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
        },
    ],
    ids=["segresnet", "unet"],
)
def test_activation_checkpointing_keeps_less_and_computes_the_same(net: dict) -> None:
    net = {**net, "spatial_dims": 3, "in_channels": 1, "out_channels": 1}
    torch.manual_seed(0)
    plain = SegModule(net=net)
    checkpointed = SegModule(net=net, compute={"checkpointing": True})
    checkpointed.net.load_state_dict(plain.net.state_dict())  # same parameter names with the switch on
    assert plain.net.state_dict().keys() == checkpointed.net.state_dict().keys()
    image = torch.rand(2, 1, 16, 16, 16)
    torch.manual_seed(1)
    plain_bytes, plain_grads = saved_activation_bytes(plain, image)
    torch.manual_seed(1)
    ckpt_bytes, ckpt_grads = saved_activation_bytes(checkpointed, image)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Evaluation and inference run the blocks directly.
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(image), plain.eval()(image))


def test_swinunetr_checkpointing_uses_its_own_switch() -> None:
    module = SegModule(
        net={
            "_target_": "monai.networks.nets.SwinUNETR",
            "in_channels": 1,
            "out_channels": 1,
            "feature_size": 12,
            "depths": [1, 1, 1, 1],
        },
        compute={"checkpointing": True},
    )
    assert module.net.swinViT.layers1[0].blocks[0].use_checkpoint is True


def test_channels_last_and_compile_switches() -> None:
    net = {
        "_target_": "monai.networks.nets.SegResNet",
        "in_channels": 1,
        "out_channels": 1,
        "init_filters": 8,
    }
    module = SegModule(net=net, compute={"channels_last": True, "compile": True})
    assert (
        module.net._compiled_call_impl is not None
    )  # compiled on first call (not run here: needs a compiler)

    def a_3x3x3_weight(m: SegModule) -> torch.Tensor:  # several input channels: the two layouts differ
        return next(
            c.weight for c in m.net.modules() if isinstance(c, torch.nn.Conv3d) and c.weight.shape[1] > 1
        )

    weight = a_3x3x3_weight(module)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    plain = a_3x3x3_weight(SegModule(net=net))
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last_3d)


def test_checkpointing_a_network_without_monai_blocks_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match="compute.checkpointing=true: Conv3d has no MONAI blocks to checkpoint"
    ):
        SegModule(
            net={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 1, "kernel_size": 1},
            compute={"checkpointing": True},
        )
    assert enable_activation_checkpointing(torch.nn.Conv3d(1, 1, 1)) == 0


# -- optimisers and schedules -----------------------------------------------------------------------------------

POINTWISE = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 1, "kernel_size": 1}


def fit_and_record_lr(
    module: SegModule, epochs: int, steps_per_epoch: int, accumulate: int = 1
) -> list[float]:
    """Train on random volumes and return the learning rate seen at every optimiser step."""
    lrs: list[float] = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            lrs.append(optimizer.param_groups[0]["lr"])

    data = [
        {"image": torch.rand(1, 8, 8, 8), "label": (torch.rand(1, 8, 8, 8) > 0.5).float()}
        for _ in range(steps_per_epoch * accumulate)
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=1))
    return lrs


def module_for(tmp_path: Path, *overrides: str) -> SegModule:
    cfg = compose(list(overrides), output_dir=tmp_path)
    return SegModule(net=POINTWISE, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"))


def test_sgd_with_nesterov_momentum(tmp_path: Path) -> None:
    optimizer = module_for(tmp_path, "optimizer=sgd").configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == pytest.approx(0.99) and group["lr"] == 1e-2
    adamw = module_for(tmp_path, "optimizer=adamw").configure_optimizers()
    assert isinstance(adamw, torch.optim.AdamW)


def test_no_scheduler_keeps_the_rate(tmp_path: Path) -> None:
    assert set(fit_and_record_lr(module_for(tmp_path), epochs=2, steps_per_epoch=2)) == {1e-4}


def test_poly_schedule_steps_per_epoch_over_the_run(tmp_path: Path) -> None:
    lrs = fit_and_record_lr(module_for(tmp_path, "scheduler=poly"), epochs=4, steps_per_epoch=2)
    expected = [1e-4 * (1 - epoch / 4) ** 0.9 for epoch in range(4) for _ in range(2)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_cosine_schedule_over_max_epochs(tmp_path: Path) -> None:
    import math

    lrs = fit_and_record_lr(module_for(tmp_path, "scheduler=cosine"), epochs=4, steps_per_epoch=1)
    assert lrs == pytest.approx([1e-4 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)], rel=1e-6)


def test_warmup_cosine_steps_per_optimiser_step_with_accumulation(tmp_path: Path) -> None:
    module = module_for(tmp_path, "scheduler=warmup_cosine", "scheduler.warmup_fraction=0.25")
    lrs = fit_and_record_lr(module, epochs=2, steps_per_epoch=4, accumulate=2)
    # 8 optimiser steps (16 batches, 2 accumulated per step); 2 of them warm up linearly from 0.
    assert len(lrs) == 8
    scheduler = module.lr_schedulers()
    assert (scheduler.t_total, scheduler.warmup_steps) == (8, 2)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5e-4) and lrs[2] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 0.2e-4
