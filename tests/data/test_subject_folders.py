"""The reference lab's data as it lies: subject folders whose files all have the same names, locally and in S3.

Check, train, predict and evaluate must agree on the case ids (the subject folders' names), from the command
line as a user runs them; a model trained on a two-column CSV predicts from that same CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import pytest

from seglight import compose
from seglight.core.errors import DataError
from seglight.data.folders import read_folder_cases
from seglight.data.remote import RemoteCache
from seglight.evaluate import evaluate
from seglight.prediction.cases import predict
from tests.helpers import S3, make_subject_folders, run_cli

SUBJECTS = [f"subj_{i:03d}" for i in range(5)]
TINY = ["data.spatial_size=[16,16,8]", "data.num_workers=0", "model.init_filters=8", "trainer.max_epochs=1"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subject_folders(tmp_path_factory.mktemp("lab") / "train", SUBJECTS)


@pytest.fixture(scope="module")
def folder_run(subjects: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One epoch of ``seglight.train data=folder`` on the subject folders: the run folder."""
    run_dir = tmp_path_factory.mktemp("folder-run")
    result = run_cli(
        "seglight.train",
        "data=folder",
        f"data.root={subjects}",
        *TINY,
        *QUIET,
        f"hydra.run.dir={run_dir}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {p.name[: -len(".nii.gz")]: nib.load(p).shape for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.slow
def test_check_train_predict_and_evaluate_agree_on_the_subject_ids(
    subjects: Path, folder_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    check = run_cli(
        "seglight.check",
        "data=folder",
        f"data.root={subjects}",
        f"hydra.run.dir={tmp_path / 'check'}",
        cache=cache_dir,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert f"OK: {len(SUBJECTS)} cases passed" in check.stdout
    report = json.loads((tmp_path / "check" / "check_report.json").read_text())
    assert sorted(c["case_id"] for c in report["cases"]) == SUBJECTS

    split = json.loads((folder_run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == SUBJECTS

    masks = tmp_path / "masks"
    result = run_cli(
        "seglight.predict",
        f"ckpt={folder_run / 'checkpoints' / 'last.ckpt'}",
        f"input={subjects}",
        f"output={masks}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # One mask per subject, each in its own subject's geometry (the subjects differ in size).
    assert shapes(masks) == {s: nib.load(subjects / s / "img.nii.gz").shape for s in SUBJECTS}

    result = run_cli(
        "seglight.evaluate",
        f"pred={masks}",
        f"gt={subjects}",
        f"hydra.run.dir={tmp_path / 'evaluate'}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with (masks / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["status"]) for r in rows] == [(s, "ok") for s in SUBJECTS]


@pytest.mark.slow
def test_the_lab_datalist_straight_from_s3(
    s3: S3, subjects: Path, folder_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    url = s3.upload(subjects, "lab-bucket", "train")
    entries = [{"image": f"{url}/{s}/img.nii.gz", "mask": f"{url}/{s}/label.nii.gz"} for s in SUBJECTS]
    s3.client.put_object(Bucket="lab-bucket", Key="train.json", Body=json.dumps(entries).encode())
    datalist = "s3://lab-bucket/train.json"
    remote = tmp_path / "remote"

    run_dir = tmp_path / "run"
    result = run_cli(
        "seglight.train",
        "data=datalist",
        f"data.datalist={datalist}",
        "data.label_key=mask",
        f"data.remote.cache_dir={remote}",
        *TINY,
        *QUIET,
        f"hydra.run.dir={run_dir}",
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == SUBJECTS

    # Whatever trained also predicts: the same datalist, one mask per subject, matched by evaluate.
    masks = tmp_path / "masks"
    report = predict(run_dir / "checkpoints" / "last.ckpt", datalist, masks, cache_dir=tmp_path, device="cpu")
    assert sorted(report.written) == SUBJECTS and not report.failed
    assert shapes(masks) == {s: nib.load(subjects / s / "img.nii.gz").shape for s in SUBJECTS}
    scored = evaluate(masks, datalist, label_key="mask")
    assert scored.cases("ok") == SUBJECTS

    # Subject folders in S3 (data=folder data.root=s3://...): the same ids, for training and for prediction.
    found = read_folder_cases(url, store=RemoteCache(remote))
    assert [c["case_id"] for c in found.cases] == SUBJECTS and not found.incomplete
    assert found.cases[0]["label"] == f"{url}/subj_000/label.nii.gz"
    with pytest.raises(
        DataError, match=r"^s3://no-such-bucket/train: bucket 'no-such-bucket' does not exist at"
    ):
        read_folder_cases("s3://no-such-bucket/train", store=RemoteCache(remote))
    with pytest.raises(
        DataError, match=r"no file matches data.image_pattern='\*/img.nii.gz' \(nothing is stored"
    ):
        read_folder_cases(f"{url}-typo", store=RemoteCache(remote))
    folder_masks = tmp_path / "folder-masks"
    report = predict(
        folder_run / "checkpoints" / "last.ckpt", url, folder_masks, cache_dir=tmp_path, device="cpu"
    )
    assert sorted(report.written) == SUBJECTS


def test_a_model_trained_on_a_two_column_csv_predicts_from_that_csv(tmp_path: Path, cache_dir: Path) -> None:
    from seglight.train import train

    files = {"t1": "t1.nii.gz", "t2": "t2.nii.gz", "label": "mask.nii.gz"}
    lab = make_subject_folders(tmp_path / "lab", SUBJECTS[:4], files)
    with (lab / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t1", "t2", "mask"])
        writer.writerows([f"{s}/t1.nii.gz", f"{s}/t2.nii.gz", f"{s}/mask.nii.gz"] for s in SUBJECTS[:4])
    cfg = compose(
        [
            "data=datalist",
            f"data.datalist={lab / 'train.csv'}",
            "data.image_key=[t1,t2]",
            "data.label_key=mask",
            "data.val_fraction=0.25",
            *TINY,
            *QUIET,
        ],
        output_dir=tmp_path / "run",
    )
    summary = train(cfg)
    report = predict(summary["last_checkpoint"], lab / "train.csv", tmp_path / "masks", device="cpu")
    # Both columns, as in training (not a fallback to an "image" column the CSV does not have), and the
    # subjects named by their folders, as in training.
    assert sorted(report.written) == SUBJECTS[:4] and not report.failed
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == SUBJECTS[:4]
