"""Dataset layouts (nnU-Net v2, multi-channel MSD, CSV/JSON datalists), channels and labels, and k-fold splits;
one detector of what a path holds, which training, prediction, evaluation and SageMaker channels share."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from seglight import SegDataModule, compose
from seglight.config.builder import build_module
from seglight.core.errors import ConfigError, DataError
from seglight.data.layouts import find_layout
from seglight.evaluation.ground_truth import ground_truth
from seglight.prediction.inputs import list_inputs
from seglight.sagemaker.channels import find_data
from tests.helpers import (
    AXIAL,
    S3,
    make_msd_dataset,
    make_subject_folders,
    nifti_with_affine,
    write_dicom_series,
    write_nifti,
)

SHAPE = (20, 20, 12)


def cube_label(num_labels: int = 2) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:10, 4:10, 3:8] = 1
    if num_labels == 2:
        label[12:16, 12:16, 3:8] = 2
    return label


def make_nnunet_dataset(root: Path, num_cases: int = 3, channels=("T2", "ADC")) -> Path:
    """nnU-Net v2 raw layout: channel c of a case is a constant volume of value 100*(c+1) (to check the order)."""
    for i in range(num_cases):
        case = f"prostate_{i:03d}"
        for c in range(len(channels)):
            write_nifti(
                root / "imagesTr" / f"{case}_{c:04d}.nii.gz", np.full(SHAPE, 100.0 * (c + 1), np.float32)
            )
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", cube_label())
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def module(tmp_path: Path, **kwargs) -> SegDataModule:
    defaults = dict(
        spatial_size=[16, 16, 8],
        num_workers=0,
        batch_size=2,
        val_fraction=0.34,
        a_min=0.0,
        a_max=400.0,
        split_path=str(tmp_path / "run" / "split.json"),
        splits_path=str(tmp_path / "run" / "splits.json"),
    )
    return SegDataModule(**{**defaults, **kwargs})


def test_nnunet_layout_stacks_channels_in_order(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "Dataset001_Prostate")
    dm = module(tmp_path, root=str(root))
    # Known before setup, from dataset.json alone: what the model config needs.
    assert dm.num_input_channels == 2
    assert dm.label_names == {0: "background", 1: "PZ", 2: "TZ"}
    cases = dm.read_cases()
    assert [c["case_id"] for c in cases] == ["prostate_000", "prostate_001", "prostate_002"]
    assert cases[0]["image"] == [
        str(root / "imagesTr" / "prostate_000_0000.nii.gz"),
        str(root / "imagesTr" / "prostate_000_0001.nii.gz"),
    ]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16, 8) and batch["label"].shape == (2, 1, 16, 16, 8)
    # Channel 0 is the _0000 file (100 -> 0.25 in the 0..400 window), channel 1 the _0001 file (0.5).
    assert torch.allclose(batch["image"][:, 0], torch.tensor(0.25)) and torch.allclose(
        batch["image"][:, 1], torch.tensor(0.5)
    )
    assert set(torch.unique(batch["label"]).tolist()) == {0.0, 1.0, 2.0}


def test_nnunet_count_mismatch_and_missing_channel_file(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "ds", num_cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 4}))
    with pytest.raises(DataError, match="numTraining is 4 but .*labelsTr holds 3 label files"):
        module(tmp_path, root=str(root)).read_cases()
    (root / "dataset.json").write_text(json.dumps(meta))
    missing = root / "imagesTr" / "prostate_001_0001.nii.gz"
    missing.unlink()
    with pytest.raises(DataError, match="file not found") as err:
        module(tmp_path, root=str(root)).setup("fit")
    assert str(missing) in str(err.value)


def test_channels_and_classes_flow_into_the_model(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "ds", channels=("T2", "ADC", "DWI"))
    cfg = compose(["data=nnunet", f"data.root={root}"], output_dir=tmp_path / "run")
    datamodule = SegDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    net = build_module(cfg, datamodule).net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].in_channels == 3, "input channels come from channel_names"
    assert convs[-1].out_channels == 3, "background + PZ + TZ"


def test_msd_four_dimensional_multimodal_images(tmp_path: Path) -> None:
    root = tmp_path / "Task01"
    training = []
    for i in range(3):
        image = np.stack([np.full(SHAPE, 100.0), np.full(SHAPE, 300.0)], axis=-1).astype(np.float32)
        write_nifti(root / "imagesTr" / f"brain_{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"brain_{i}.nii.gz", cube_label(1))
        training.append({"image": f"./imagesTr/brain_{i}.nii.gz", "label": f"./labelsTr/brain_{i}.nii.gz"})
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "tumour"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    dm = module(tmp_path, root=str(root))
    assert dm.num_input_channels == 2 and dm.label_names == {0: "background", 1: "tumour"}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16, 8)
    assert torch.allclose(batch["image"][:, 1], torch.tensor(0.75))


def test_csv_datalist_with_one_column_per_channel(tmp_path: Path) -> None:
    data = tmp_path / "lab"
    rows = []
    for i in range(3):
        for name, value in (("t1", 100.0), ("t2", 200.0)):
            write_nifti(data / "scans" / f"s{i}_{name}.nii.gz", np.full(SHAPE, value, np.float32))
        write_nifti(data / "masks" / f"s{i}.nii.gz", cube_label(1))
        rows.append(
            {
                "subject": f"s{i}",
                "t1": f"scans/s{i}_t1.nii.gz",
                "t2": f"scans/s{i}_t2.nii.gz",
                "mask": f"masks/s{i}.nii.gz",
            }
        )
    with (data / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dm = module(
        tmp_path,
        datalist=str(data / "train.csv"),
        image_key=["t1", "t2"],
        label_key="mask",
        labels={"0": "background", "1": "lesion"},
    )
    # No dataset.json: channels from the image columns, labels from data.labels.
    assert dm.num_input_channels == 2 and dm.label_names == {0: "background", 1: "lesion"}
    cases = dm.read_cases()
    assert cases[0]["image"] == [str(data / "scans" / "s0_t1.nii.gz"), str(data / "scans" / "s0_t2.nii.gz")]
    assert cases[0]["subject"] == "s0"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16, 8)
    assert torch.allclose(batch["image"][:, 0], torch.tensor(0.25)) and torch.allclose(
        batch["image"][:, 1], torch.tensor(0.5)
    )


def test_json_datalist_monai_style_and_header_channels(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    entries = json.loads((root / "dataset.json").read_text())["training"]
    (root / "dataset.json").unlink()
    datalist = tmp_path / "lists" / "fold.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "cube"}, "training": entries}))
    dm = module(tmp_path, datalist=str(datalist), root=str(root))  # paths relative to data.root
    assert dm.label_names == {0: "background", 1: "cube"}
    assert dm.num_input_channels == 1  # from the first image's header
    assert [c["case_id"] for c in dm.read_cases()] == ["case_0", "case_1", "case_2"]
    dm.setup("fit")
    assert len(dm.train_cases) == 2 and len(dm.val_cases) == 1
    with pytest.raises(ConfigError, match="must end in .csv or .json"):
        (tmp_path / "list.txt").write_text("x")
        module(tmp_path, datalist=str(tmp_path / "list.txt")).read_cases()


def test_kfold_splits_are_saved_reused_and_cover_every_case(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", num_cases=6)
    splits = tmp_path / "study" / "splits.json"
    val_sets = []
    for fold in range(3):
        # Each fold is its own run (own split.json); all share the study's splits.json.
        dm = module(
            tmp_path,
            root=str(root),
            fold=fold,
            num_folds=3,
            split_seed=fold,  # a different seed per run: the saved partition still wins
            splits_path=str(splits),
            split_path=str(tmp_path / f"run{fold}" / "split.json"),
            cache="none",
        )
        dm.setup("fit")
        val = {c["case_id"] for c in dm.val_cases}
        assert len(val) == 2 and not val & {c["case_id"] for c in dm.train_cases}
        record = json.loads((tmp_path / f"run{fold}" / "split.json").read_text())
        assert record["fold"] == fold and set(record["val"]) == val
        val_sets.append(val)
    assert set().union(*val_sets) == {f"case_{i}" for i in range(6)}
    folds = json.loads(splits.read_text())  # nnU-Net's splits_final.json format
    assert [set(f["val"]) for f in folds] == val_sets
    assert all(set(f["train"]) | set(f["val"]) == set().union(*val_sets) for f in folds)

    with pytest.raises(ConfigError, match="holds 3 folds but data.num_folds is 5"):
        module(tmp_path, root=str(root), fold=0, num_folds=5, splits_path=str(splits)).setup("fit")
    other = make_msd_dataset(tmp_path / "other", num_cases=7)
    with pytest.raises(ConfigError, match="was made for other cases .1 new: case_6"):
        module(tmp_path, root=str(other), fold=0, num_folds=3, splits_path=str(splits)).setup("fit")
    with pytest.raises(ConfigError, match="data.fold must be between 0 and"):
        module(tmp_path, root=str(root), fold=3, num_folds=3)


def test_fold_options_compose_from_the_command_line(tmp_path: Path) -> None:
    cfg = compose(["data=msd", "data.root=/x", "data.fold=2"], output_dir=tmp_path)
    assert cfg.data.fold == 2 and cfg.data.num_folds == 5
    assert cfg.data.splits_path == str(tmp_path.resolve() / "splits.json")
    assert cfg.data.cache in ("auto", "memory", "disk") and cfg.data.on_bad_case == "error"
    assert cfg.data.remote.cache_dir.endswith("remote") and cfg.data.remote.endpoint_url is None


# -- one detector: training, prediction, evaluation and SageMaker channels read a folder alike ---------------------

LAID_OUT = {  # folder -> (what the detector says it holds, its case ids)
    "msd": ("dataset", ["case_0", "case_1", "case_2"]),
    "nnunet": ("dataset", ["prostate_000", "prostate_001", "prostate_002"]),
    "subjects": ("folder", ["subj_000", "subj_001", "subj_002"]),
}


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("laid_out")
    return {
        "msd": make_msd_dataset(base / "msd", num_cases=3),
        "nnunet": make_nnunet_dataset(base / "nnunet", channels=("T2",)),
        "subjects": make_subject_folders(base / "subjects", LAID_OUT["subjects"][1]),
    }


def read_by_every_caller(path: str) -> dict[str, object]:
    """What each caller makes of ``path``: the detector's verdict, and the cases that training (with the layout
    option that verdict calls for), prediction and evaluation read from it, as case id -> label file."""
    kind = find_layout(path).kind
    training = SegDataModule(root=path, layout="folder" if kind == "folder" else "auto", num_workers=0)
    truth, _ = ground_truth(path)
    return {
        "kind": kind,
        "training": {c["case_id"]: c["label"] for c in training.read_cases()},
        "prediction": [c.case_id for c in list_inputs(path)],
        "evaluation": sorted(truth),
    }


@pytest.mark.parametrize("name", sorted(LAID_OUT))
def test_training_prediction_evaluation_and_sagemaker_read_a_folder_alike(
    laid_out: dict[str, Path], name: str
) -> None:
    root = laid_out[name]
    kind, ids = LAID_OUT[name]
    seen = read_by_every_caller(str(root))
    assert seen["kind"] == kind
    assert sorted(seen["training"]) == seen["prediction"] == seen["evaluation"] == ids
    truth, _ = ground_truth(root)
    assert truth == seen["training"], "evaluation compares with the label files training trains on"
    channel = find_data("training", root)
    assert (channel.layout, channel.path) == (kind, root)


def test_a_folder_of_scans_is_read_alike_and_refused_alike_with_what_was_expected(
    laid_out: dict[str, Path], tmp_path: Path
) -> None:
    scans = laid_out["msd"] / "imagesTr"
    assert find_layout(str(scans)).kind == "files"
    assert [c.case_id for c in list_inputs(scans)] == LAID_OUT["msd"][1]
    assert sorted(ground_truth(scans)[0]) == LAID_OUT["msd"][1]
    # A SageMaker channel and a training root need labels beside the scans: each names the folder and what it
    # expected instead.
    with pytest.raises(
        DataError, match=rf"training channel {scans} holds nothing seglight can read \(case_0"
    ):
        find_data("training", scans)
    with pytest.raises(
        DataError, match=rf"{scans}/dataset.json: not found; data.root must hold a dataset.json"
    ):
        SegDataModule(root=str(scans)).read_cases()
    missing = tmp_path / "nowhere"
    for call, where in (
        (lambda: list_inputs(missing), f"input={missing}: no such file or folder"),
        (lambda: ground_truth(missing), f"gt={missing}: no such file or folder"),
        (lambda: find_data("training", missing), f"training channel {missing}: no such folder"),
        (lambda: SegDataModule(root=str(missing)).read_cases(), f"data.root {missing}: no such folder"),
    ):
        with pytest.raises(DataError) as err:
            call()
        assert str(err.value).startswith(where) and "expected" in str(err.value), str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"empty is empty: it holds no \.nii or \.nii\.gz files, no subject folders"
    ):
        ground_truth(tmp_path / "empty")
    image = scans / "case_0.nii.gz"
    assert find_layout(str(image)).kind == "image" and [c.case_id for c in list_inputs(image)] == ["case_0"]
    with pytest.raises(DataError, match=rf"gt={image} is a \.nii or \.nii\.gz file; expected a dataset"):
        ground_truth(image)


def test_a_folder_read_from_an_s3_prefix_is_read_as_the_same_local_folder(
    s3: S3, laid_out: dict[str, Path]
) -> None:
    for name in ("msd", "subjects"):
        url = s3.upload(laid_out[name], "layouts", name)
        local, remote = read_by_every_caller(str(laid_out[name])), read_by_every_caller(url)
        assert remote["kind"] == local["kind"]
        for caller in ("prediction", "evaluation"):
            assert remote[caller] == local[caller], caller
        assert sorted(remote["training"]) == sorted(local["training"])
        assert remote["training"]["case_0" if name == "msd" else "subj_000"].startswith(f"{url}/")
    with pytest.raises(DataError, match=r"input=s3://layouts/nothing: no such object or prefix"):
        list_inputs("s3://layouts/nothing")


def test_dicom_series_are_one_more_kind_of_what_a_path_holds(tmp_path: Path, s3: S3) -> None:
    """A folder (at any depth), a zip or an s3:// prefix of DICOM files is ``dicom``: prediction reads each series
    as a case; callers that read only NIfTI refuse it as any folder without what they expected."""
    study = tmp_path / "export" / "study"
    files = write_dicom_series(study / "ct", nifti_with_affine((20, 18, 16), AXIAL), series_number=3)
    write_dicom_series(study / "mr", nifti_with_affine((20, 18, 16), AXIAL, seed=1), series_number=7)
    (study / "README.txt").write_text("from the PACS")
    archive = tmp_path / "study.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", study)
    url = s3.upload(study, "dicom-layouts", "study")

    for path in (tmp_path / "export", study, archive, url):
        assert find_layout(str(path)).kind == "dicom", path
        cases = list_inputs(path, dicom_cache_dir=tmp_path / "cache")
        assert [c.case_id for c in cases] == ["PAT1_20240102_series3", "PAT1_20240102_series7"]
        assert all(c.problem is None and c.image.endswith(f"{c.case_id}.nii.gz") for c in cases)
    assert find_layout(str(files[0])).kind == "dicom"  # one file of a series: its series, a single image
    # A NIfTI folder stays a folder of NIfTI files, even with a DICOM file in it.
    write_nifti(tmp_path / "mixed" / "scan.nii.gz", np.zeros((4, 4, 4), np.float32))
    shutil.copy(files[0], tmp_path / "mixed" / "IM0001.dcm")
    assert find_layout(str(tmp_path / "mixed")).kind == "files"
    with pytest.raises(
        DataError, match=r"gt=.*study holds nothing seglight can read \(README.txt, ct/, mr/\)"
    ):
        ground_truth(study)
    with pytest.raises(DataError, match=r"dataset.json: not found"):
        SegDataModule(root=str(study)).read_cases()
