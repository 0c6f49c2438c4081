"""Pictures: the three panels, the progress plot and its history in checkpoints, the viz command."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglight import SegDataModule, SegModule, compose
from seglight.core.errors import ConfigError, DataError
from seglight.training.callbacks.progress_plot import ProgressPlot
from seglight.training.callbacks.validation_picture import ValidationPicture
from seglight.visualization.figures import (
    choose_slices,
    nifti_figure,
    progress_figure,
    save_figure,
    three_panel_figure,
)
from seglight.viz import run

PNG = b"\x89PNG\r\n\x1a\n"


def volume_with_label(shape=(20, 16, 12)) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, dtype=np.uint8)
    label[5:9, 4:12, 7] = 1  # most foreground: x 5..8, y 4..11, z 7
    label[6, 6:8, 2:6] = 2
    image = np.random.default_rng(0).normal(0.0, 0.1, size=shape).astype(np.float32) + label
    return image, label


def test_slice_choice_most_foreground_or_middle() -> None:
    _, label = volume_with_label()
    assert choose_slices(label.shape, [label, None], "max") == {"axial": 7, "coronal": 6, "sagittal": 6}
    assert choose_slices(label.shape, [np.zeros_like(label), label], "max")["axial"] == 7  # the prediction's
    assert choose_slices(label.shape, [None, None], "max") == {"axial": 6, "coronal": 8, "sagittal": 10}
    assert choose_slices(label.shape, [label], "middle") == {"axial": 6, "coronal": 8, "sagittal": 10}


def test_three_panels_in_three_views_to_png(tmp_path: Path) -> None:
    image, label = volume_with_label()
    fig = three_panel_figure(image, label, np.roll(label, 1, axis=0), spacing=(0.8, 0.8, 2.5), title="case")
    axes = fig.get_axes()
    assert len(axes) == 9
    assert [ax.get_title() for ax in axes[:3]] == ["input", "ground truth", "prediction"]
    assert [axes[i].get_ylabel() for i in (0, 3, 6)] == ["axial 7", "coronal 6", "sagittal 6"]
    path = save_figure(fig, tmp_path / "pictures" / "case.png")
    assert path.read_bytes()[:8] == PNG and Image.open(path).size[0] > 300
    assert [p.name for p in path.parent.iterdir()] == ["case.png"]
    with pytest.raises(DataError, match="not the same grid"):
        three_panel_figure(image, label[:-1])


def test_nifti_overlay_in_the_scans_own_geometry(tmp_path: Path) -> None:
    image, label = volume_with_label()
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS, drawn in RAS order without resampling
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "label.nii.gz")
    fig = nifti_figure(tmp_path / "scan.nii.gz", tmp_path / "label.nii.gz", nib.Nifti1Image(label, affine))
    assert fig.get_axes()[0].get_ylabel() == "axial 7"
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "other.nii.gz")
    with pytest.raises(DataError, match="pred: not on the image's voxel grid"):
        nifti_figure(tmp_path / "scan.nii.gz", None, tmp_path / "other.nii.gz")


def test_viz_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, label = volume_with_label()
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "mask.nii.gz")
    out = tmp_path / "overlay.png"
    options = [f"image={tmp_path / 'scan.nii.gz'}", f"pred={tmp_path / 'mask.nii.gz'}", f"out={out}"]
    cfg = compose([*options, "slice=middle"], config_name="viz", output_dir=tmp_path)
    assert run(cfg) == out
    assert out.read_bytes()[:8] == PNG and f"Wrote {out}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="slice='top': choose one of max, middle"):
        run(compose([*options, "slice=top"], config_name="viz", output_dir=tmp_path))
    with pytest.raises(ConfigError, match="image= is required"):
        run(compose([], config_name="viz", output_dir=tmp_path))


def test_progress_plot_history_survives_a_checkpoint(tmp_path: Path) -> None:
    plot = ProgressPlot(dirpath=str(tmp_path))
    for epoch, (loss, dice, lr) in enumerate([(0.9, 0.1, 1e-3), (0.7, 0.4, 5e-4), (0.5, 0.6, 1e-5)]):
        plot.history["Loss/train"][epoch] = loss
        plot.history["Dice/val"][epoch] = dice
        plot.history["lr"][epoch] = lr
    restored = ProgressPlot()
    restored.load_state_dict(plot.state_dict())
    assert restored.history["Dice/val"] == {0: 0.1, 1: 0.4, 2: 0.6}
    fig = progress_figure(restored.history)
    loss_ax, dice_ax, lr_ax = fig.get_axes()
    assert [ax.get_title() for ax in (loss_ax, dice_ax, lr_ax)] == ["loss", "Dice/val", "learning rate"]
    assert list(dice_ax.get_lines()[0].get_ydata()) == [0.1, 0.4, 0.6]
    assert lr_ax.get_yscale() == "log"  # two decades of learning rate
    assert save_figure(fig, tmp_path / "progress.png").read_bytes()[:8] == PNG


def test_callbacks_log_the_picture_every_n_validations_and_write_progress(tmp_path: Path) -> None:
    cases = []
    for i in range(2):
        image, label = volume_with_label((16, 16, 16))
        cases.append({"image": str(tmp_path / f"i{i}.nii.gz"), "label": str(tmp_path / f"l{i}.nii.gz")})
        nib.save(nib.Nifti1Image(image * 1000.0, np.eye(4)), cases[-1]["image"])
        nib.save(nib.Nifti1Image((label > 0).astype(np.uint8), np.eye(4)), cases[-1]["label"])
    module = SegModule(
        net={"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 1, "kernel_size": 1},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1},
        metrics={"hd95": False},
    )
    data = SegDataModule(
        datalist=cases, spatial_size=[16, 16, 16], num_workers=0, batch_size=1, val_fraction=0.5
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=""),
        callbacks=[ValidationPicture(every_n_val_epochs=2), ProgressPlot(dirpath=str(tmp_path))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("Validation/overlay")] == [0, 2]  # 1st and 3rd validation
    history = next(c for c in trainer.callbacks if isinstance(c, ProgressPlot)).history
    assert sorted(history["Loss/train"]) == sorted(history["Dice/val"]) == sorted(history["lr"]) == [0, 1, 2]
    assert history["lr"][0] == pytest.approx(0.1)
    assert (tmp_path / "progress.png").read_bytes()[:8] == PNG
