"""No training or validation step makes the host wait for the device, and what replaced the waits computes the same:
Dice on the device, HD95/NSD in a background thread, the NaN guard's deferred read, the GPU-resident cache.

On a GPU every ``.item()``, ``bool(tensor)``, ``nonzero`` or ``masked_select`` of a device tensor stalls the host
until the device has caught up. Here, on the CPU, the same calls are caught where they enter PyTorch's dispatcher (a
TorchDispatchMode only observes: nothing in seglight is replaced). Values PyTorch itself keeps on the host whatever
the device (the optimiser's step count, the loader's seeds) are read in its own code, which is left out.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from omegaconf import open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from seglight.core.errors import ConfigError
from seglight.data.caching.device import move_to_device, use_gpu_cache
from seglight.models.metrics import DeviceDiceMetric, HD95Metric, SurfaceMetrics
from seglight.train import train
from seglight.training.optim import build_optimizer
from tests.helpers import tensorboard_scalars, tiny_config

# PyTorch's own host-side bookkeeping: Adam's step count is a CPU tensor unless fused (seglight's choice on CUDA,
# where nothing is read), and the loader draws its seeds from CPU tensors.
HOST_SIDE = ("torch/optim/", "torch/utils/data/")
# Operators that copy a value (or a data-dependent size) from the device to the host.
SYNCING = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float(), `if tensor:`
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
}


class HostReads(TorchDispatchMode):
    """Records each syncing operator called in this thread, with the seglight/Lightning line that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func._schema.name in SYNCING:
            stack = traceback.extract_stack()
            if not any(part in frame.filename for frame in stack for part in HOST_SIDE):
                frames = [f for f in stack if "seglight" in f.filename or "lightning" in f.filename]
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
                self.calls.append(f"{func._schema.name} at {where}")
        return func(*args, **(kwargs or {}))


class CountHostReads(L.Callback):
    """Watches the second epoch's training steps (with everything between them) and validation steps."""

    instances: list[CountHostReads] = []

    def __init__(self) -> None:
        self.train_calls: list[str] = []
        self.val_calls: list[str] = []
        self._mode: HostReads | None = None
        self.watched_steps = 0
        CountHostReads.instances.append(self)

    def _start(self) -> None:
        self._mode = HostReads()
        self._mode.__enter__()

    def _stop(self) -> list[str]:
        assert self._mode is not None
        self._mode.__exit__(None, None, None)
        calls, self._mode = self._mode.calls, None
        return calls

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            self._start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._mode is not None:
            self.watched_steps += 1
            if batch_idx == trainer.num_training_batches - 1:
                self.train_calls += self._stop()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if trainer.current_epoch >= 1 and not trainer.sanity_checking:
            self._start()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if self._mode is not None:
            self.val_calls += self._stop()


def test_training_and_validation_steps_never_wait_for_the_device(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, "trainer.enable_progress_bar=true", "metrics.hd95_every_n=2")
    with open_dict(cfg):
        cfg.callbacks.count_host_reads = {"_target_": f"{__name__}.CountHostReads"}
    summary = train(cfg)
    counter = CountHostReads.instances[-1]
    assert counter.watched_steps >= 2  # the second epoch's steps were watched ...
    assert counter.train_calls == []  # ... and none of them, nor the loop around them, read the device
    assert counter.val_calls == []

    # HD95 at the first validation and every 2nd after it: epoch 0 of the two; Dice at every one.
    scalars = tensorboard_scalars(run_dir)
    assert [step for step, _ in scalars["Dice/val"]] and len(scalars["Dice/val"]) == 2
    assert len(scalars["HD95/val"]) == 1
    # The run summary says how long validation took.
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["validations"] == 2 == summary["validations"]
    assert 0 < saved["validation_time_s"] <= saved["wall_time_s"]


def masks(seed: int, classes: int, batch: int = 4, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prediction and ground truth in the metrics' layout, with empty cases on either side."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, classes, (batch, 1, size, size, size), generator=g)
    truth = torch.randint(0, classes, (batch, 1, size, size, size), generator=g)
    truth[0] = 0  # nothing to find
    pred[1] = 0  # nothing found
    if classes == 2:
        return pred.float(), truth.float()
    return one_hot(pred, classes, dim=1), one_hot(truth, classes, dim=1)


@pytest.mark.parametrize("classes", [2, 4])
def test_device_dice_gives_monais_values(classes: int) -> None:
    ours, monai = DeviceDiceMetric(), DiceMetric(include_background=False, reduction="mean")
    for seed in range(3):
        pred, truth = masks(seed, classes)
        ours(pred, truth)
        monai(pred, truth)
    torch.testing.assert_close(ours.get_buffer(), monai.get_buffer(), equal_nan=True)
    assert torch.isnan(
        ours.get_buffer()
    ).any()  # empty ground truth: NaN, left out of the means as MONAI does


def test_surface_metrics_in_a_thread_equal_the_inline_ones() -> None:
    expand = lambda labels: labels.float()  # noqa: E731 - binary masks
    inline, threaded = HD95Metric(), HD95Metric()
    now, later = (
        SurfaceMetrics([inline], expand, background=False),
        SurfaceMetrics([threaded], expand, background=True),
    )
    spacing = [[0.8, 0.8, 2.5]] * 4
    for seed in range(3):
        pred, truth = masks(seed, 2)
        now.submit(pred.to(torch.uint8), truth.to(torch.uint8), spacing)
        later.submit(pred.to(torch.uint8), truth.to(torch.uint8), spacing)
    later.wait()
    torch.testing.assert_close(threaded.get_buffer(), inline.get_buffer(), equal_nan=True)
    later.close()

    def broken(labels: torch.Tensor) -> torch.Tensor:
        raise ValueError("bad mask")

    failing = SurfaceMetrics([HD95Metric()], broken, background=True)
    failing.submit(pred.to(torch.uint8), truth.to(torch.uint8), spacing)
    with pytest.raises(ValueError, match="bad mask"):
        failing.wait()  # the thread's error reaches the caller
    failing.close()


def test_the_gpu_cache_choice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seglight")
    gpu = torch.device("cuda", 0)
    gb = 10**9
    assert use_gpu_cache("auto", 2 * gb, gpu, share=0.25, free=20 * gb)  # fits in a quarter: on the GPU
    assert not use_gpu_cache("auto", 6 * gb, gpu, share=0.25, free=20 * gb)  # does not: host memory
    assert "in host memory" in caplog.text
    assert use_gpu_cache("gpu", 6 * gb, gpu, share=0.25, free=20 * gb)  # asked for: taken, with a warning
    assert "may run out of GPU memory" in caplog.text
    with pytest.raises(ConfigError, match="data.cache=gpu: the training cache takes 19.00 GB"):
        use_gpu_cache("gpu", 19 * gb, gpu, share=0.25, free=20 * gb)
    assert not use_gpu_cache("gpu", 1, None, share=0.25)  # training on the CPU: the cache stays in memory
    assert "stays in host memory" in caplog.text
    assert not use_gpu_cache("auto", 1, None, share=0.25)


def test_a_device_resident_cache_is_flipped_and_batched_on_its_device(
    tmp_path: Path, cache_dir: Path
) -> None:
    from seglight.config.builder import build

    datamodule, _, _ = build(tiny_config(tmp_path / "run"))
    datamodule.setup("fit")
    # PyTorch's meta device stands in for the GPU here: nothing may bring the tensors back to the host.
    move_to_device(datamodule.train_ds, torch.device("meta"))
    assert datamodule.on_gpu
    batches = list(datamodule.train_dataloader())
    assert batches and all(
        b["image"].device.type == "meta" and b["label"].device.type == "meta" for b in batches
    )
    assert batches[0]["image"].shape[1:] == (1, 16, 16, 16)


def test_the_optimiser_is_built_as_configured_off_cuda() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    adam = build_optimizer({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}, iter(params))
    assert type(adam) is torch.optim.Adam and not adam.defaults.get("fused")  # fused only for CUDA weights
    sgd = build_optimizer(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "fused": False}, iter(params)
    )
    assert sgd.defaults["fused"] is False


@pytest.mark.parametrize(("classes", "value"), [(1, 2), (3, 5)])
def test_validation_names_a_case_whose_label_has_no_output(classes: int, value: int) -> None:
    from seglight import SegModule
    from seglight.core.errors import DataError

    net = {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 3, "in_channels": 1}
    module = SegModule(net={**net, "out_channels": classes, "init_filters": 8}, metrics={"hd95": False})
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.uint8)
    label[0, 0, 4:8, 4:8, 4:8] = value
    batch = {"image": torch.rand(1, 1, 16, 16, 16), "label": label, "case_id": ["odd_case"]}
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    # Read once the epoch's metrics are, the range check still names the case (and one_hot never saw the value).
    with pytest.raises(DataError, match=f"odd_case: the label map holds value {value}"):
        trainer.validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)
