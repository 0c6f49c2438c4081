"""BatchNorm networks and a last training batch of one case (UNet at small sizes reaches a 1x1x1 feature map)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli, tiny_overrides, train_in_process

SMALL_UNET = ["model=unet", "model.channels=[8,16,32,64,128]"]


def unet_overrides(run_dir: Path) -> list[str]:
    """The tiny run with a small UNet (model.init_filters is a SegResNet option)."""
    return [*SMALL_UNET, *(o for o in tiny_overrides(run_dir) if not o.startswith("model."))]


@pytest.mark.slow
def test_unet_trains_on_an_odd_number_of_cases(tmp_path: Path) -> None:
    # 6 demo cases: 1 validates, 5 train in batches of 2, so each epoch would end with a batch of one.
    result = run_cli("seglight.train", *unet_overrides(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "5 training cases leave a last batch of one: it is dropped each epoch"
        in result.stdout + result.stderr
    )
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_batch_size_of_one_names_the_settings_to_change(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [o for o in unet_overrides(tmp_path) if not o.startswith(("hydra.", "data.batch_size"))]
    status = train_in_process([*overrides, "data.batch_size=1", "trainer.max_epochs=1"], tmp_path)
    assert status == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("seglight.train: error: UNet normalises over the batch (BatchNorm)")
    assert "data.batch_size=2" in message and "model.norm=instance" in message
