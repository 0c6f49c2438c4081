"""The reference lab's code, written as the lab has it (MONAI's tutorial style), for the side-by-side benchmarks.

Data: ``monai.data.Dataset`` + ``DataLoader`` running every transform on every access (LoadImaged,
EnsureChannelFirstd, Resized, ScaleIntensityRanged(-1000..1000 -> 0..1, clip), RandFlipd(prob 0.5, axis 0)).
Model: SegResNet (init_filters 16, dropout 0.2), ``DiceLoss(sigmoid=True)``, Adam; 16-bit autocast with a
GradScaler on a GPU; ``epoch_loss += loss.item()`` per step; validation every epoch with ``DiceMetric`` on
``sigmoid > 0.5``. Prediction: the same preprocessing, ``sliding_window_inference``, threshold, resize back to the
scan's shape and ``nibabel.save`` with its affine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import DataLoader, Dataset, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import SegResNet

KEYS = ["image", "label"]


def lab_transforms(size: Sequence[int], train: bool) -> mt.Compose:
    """The lab's pipeline: everything runs on every access."""
    steps = [
        mt.LoadImaged(keys=KEYS),
        mt.EnsureChannelFirstd(keys=KEYS),
        mt.Resized(keys=KEYS, spatial_size=tuple(size), mode=("trilinear", "nearest")),
        mt.ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
    ]
    if train:
        steps.append(mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0))
    return mt.Compose(steps)


def lab_loader(
    cases: Sequence[dict], size: Sequence[int], batch_size: int, workers: int, train: bool = True
) -> DataLoader:
    """``Dataset`` + ``DataLoader`` over ``{"image", "label"}`` cases, as the lab builds them."""
    data = [{"image": c["image"], "label": c["label"]} for c in cases]
    return DataLoader(
        Dataset(data, lab_transforms(size, train)),
        batch_size=batch_size if train else 1,
        shuffle=train,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def lab_model(init_filters: int = 16) -> torch.nn.Module:
    """The lab's network."""
    return SegResNet(
        spatial_dims=3, in_channels=1, out_channels=1, init_filters=init_filters, dropout_prob=0.2
    )


def train_lab(
    train_cases: Sequence[dict],
    val_cases: Sequence[dict],
    size: Sequence[int],
    max_epochs: int,
    lr: float,
    batch_size: int = 2,
    workers: int = 4,
    init_filters: int = 16,
    device: str | torch.device = "cpu",
    amp: bool = False,
    on_epoch: Callable[[int, float, float], bool] | None = None,
    validate: bool = True,
) -> list[dict[str, float]]:
    """The lab's training loop; returns per epoch its end time (s since the call), loss and validation Dice, and
    (for the benchmarks) the seconds its training part took, of which waiting for the loader, and its steps.

    ``on_epoch(epoch, seconds, dice)`` is called after each validation (``validate=False``: after each training
    epoch, with Dice NaN); returning True stops the loop.
    """
    start = time.perf_counter()
    device = torch.device(device)
    train_loader = lab_loader(train_cases, size, batch_size, workers, train=True)
    val_loader = lab_loader(val_cases, size, 1, workers, train=False)
    model = lab_model(init_filters).to(device)
    loss_function = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    dice_metric = DiceMetric(include_background=True, reduction="mean")
    post = mt.Compose([mt.Activations(sigmoid=True), mt.AsDiscrete(threshold=0.5)])
    history = []
    for epoch in range(max_epochs):
        model.train()
        epoch_loss, steps = 0.0, 0
        epoch_start = time.perf_counter()
        waiting, fetch_start = 0.0, epoch_start
        for batch in train_loader:
            waiting += time.perf_counter() - fetch_start
            inputs, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                outputs = model(inputs)
                loss = loss_function(outputs, labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            epoch_loss += loss.item()
            steps += 1
            fetch_start = time.perf_counter()
        train_seconds = time.perf_counter() - epoch_start  # .item() above waited for the device
        dice = float("nan")
        if validate:
            model.eval()
            with torch.no_grad():
                for batch in val_loader:
                    inputs, labels = batch["image"].to(device), batch["label"].to(device)
                    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                        outputs = model(inputs)
                    outputs = [post(o) for o in decollate_batch(outputs.float())]
                    dice_metric(y_pred=outputs, y=labels)
                dice = dice_metric.aggregate().item()
                dice_metric.reset()
        seconds = time.perf_counter() - start
        history.append(
            {
                "epoch": epoch,
                "seconds": seconds,
                "loss": epoch_loss / max(steps, 1),
                "dice": dice,
                "train_seconds": train_seconds,
                "waiting_seconds": waiting,
                "steps": steps,
            }
        )
        if on_epoch is not None and on_epoch(epoch, seconds, dice):
            break
    return history


def predict_lab(
    model: torch.nn.Module,
    images: Sequence[str],
    output: str | Path,
    size: Sequence[int],
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> list[Path]:
    """The lab's prediction loop: preprocess, sliding window, threshold, resize back, ``nibabel.save``."""
    device = torch.device(device)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    preprocess = mt.Compose(
        [
            mt.LoadImaged(keys="image"),
            mt.EnsureChannelFirstd(keys="image"),
            mt.Resized(keys="image", spatial_size=tuple(size), mode="trilinear"),
            mt.ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    model = model.to(device).eval()
    written = []
    for path in images:
        data = preprocess({"image": path})
        image = data["image"].as_tensor()[None].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = sliding_window_inference(image, tuple(size), 4, model, overlap=0.5)
        mask = (torch.sigmoid(logits.float()) > 0.5).float()[0].cpu()
        scan = nib.load(path)
        mask = mt.Resize(spatial_size=scan.shape[:3], mode="nearest")(mask)[0]
        target = output / Path(path).name
        nib.save(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), scan.affine), target)
        written.append(target)
    return written


def lab_cases(split: dict[str, Any], cases: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The training and validation cases of a seglight ``split.json`` record, as the lab's datalist."""
    by_id = {c["case_id"]: c for c in cases}
    return [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]
