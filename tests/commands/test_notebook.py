"""The example notebook runs top to bottom in a real Jupyter kernel (nbclient), on tiny settings."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def test_quickstart_notebook_trains_shows_and_predicts(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGLIGHT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SEGLIGHT_NOTEBOOK_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("SEGLIGHT_CACHE_DIR", str(cache_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "saved w/o outputs"
    )
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    pictures = [
        base64.b64decode(out.data["image/png"]) for out in outputs if "image/png" in out.get("data", {})
    ]
    assert len(pictures) == 2 and all(p[:8] == PNG for p in pictures)  # progress, then the three panels
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "same shape: True | same affine: True" in printed
    # The API's console is the commands': no Lightning start-up lines or litlogger tip in the cells.
    assert not re.search(r"GPU available: False|TPU available|Tip:", printed), printed
    assert (tmp_path / "run" / "progress.png").is_file() and (tmp_path / "run" / "prediction.png").is_file()
    assert len(list((tmp_path / "run").glob("*_pred.nii.gz"))) == 1
