"""Case identity for every layout, subject folders, a validation source, and what prediction lists as inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seglight import SegDataModule
from seglight.core.errors import ConfigError, DataError
from seglight.data.datalists import resolve_datalist
from seglight.prediction.inputs import list_inputs
from tests.helpers import make_subject_folders


def ids_of(paths: list, **fields) -> list[str]:
    entries = [{"image": p, "label": "x.nii.gz", **fields} for p in paths]
    return [c["case_id"] for c in resolve_datalist(entries, "/data")]


def test_ids_are_the_shortest_part_of_the_path_that_tells_cases_apart() -> None:
    lab = [f"s3://bucket/train/subj_{i:03d}/img.nii.gz" for i in range(3)]
    assert ids_of(lab) == ["subj_000", "subj_001", "subj_002"]
    # File names that differ are today's ids; nnU-Net's channel suffix is dropped for one file per channel.
    assert ids_of(["imagesTr/la_003.nii.gz", "imagesTr/la_004.nii"]) == ["la_003", "la_004"]
    assert ids_of([["p1_0000.nii.gz", "p1_0001.nii.gz"], ["p2_0000.nii.gz", "p2_0001.nii.gz"]]) == [
        "p1",
        "p2",
    ]
    # Deeper collisions: one rule for the whole dataset, never a mix of one- and two-folder ids.
    sites = ["site_a/subj_001/img.nii.gz", "site_b/subj_001/img.nii.gz", "site_b/subj_002/img.nii.gz"]
    assert ids_of(sites) == ["site_a_subj_001", "site_b_subj_001", "site_b_subj_002"]
    # Folders alone cannot tell two files of one folder apart: folder and file name together do.
    assert ids_of(["a/img.nii.gz", "b/img.nii.gz", "a/img_repeat.nii.gz"]) == [
        "a_img",
        "b_img",
        "a_img_repeat",
    ]
    # Ids name output files: anything but letters, digits and ._+- becomes "_".
    assert ids_of(["scans/Müller, Anna (2)/img.nii.gz", "scans/b/img.nii.gz"]) == ["Müller_Anna_2", "b"]


def test_an_explicit_id_wins_and_clashes_are_one_line_errors() -> None:
    entries = [
        {"image": "lab/subj_000/img.nii.gz", "mask": "lab/subj_000/label.nii.gz", "id": "P-17"},
        {"image": "lab/subj_001/img.nii.gz", "mask": "lab/subj_001/label.nii.gz", "case_id": "P-18"},
        {"image": "lab/subj_002/img.nii.gz", "mask": "lab/subj_002/label.nii.gz"},
    ]
    cases = resolve_datalist(entries, "/data", label_key="mask", source="train.json")
    assert [c["case_id"] for c in cases] == ["P-17", "P-18", "subj_002"]
    assert cases[0]["label"] == "/data/lab/subj_000/label.nii.gz" and "id" not in cases[0]

    twice = [*entries, {"image": "lab/subj_000/img.nii.gz", "mask": "other.nii.gz"}]
    with pytest.raises(DataError) as err:
        resolve_datalist(twice, "/data", label_key="mask", source="train.json")
    assert str(err.value) == (
        "train.json: entries 0 and 3 both have the image /data/lab/subj_000/img.nii.gz; "
        "each case needs an image of its own"
    )
    clash = [entries[0], {**entries[2], "id": "P-17"}]
    with pytest.raises(
        DataError, match=r"^train.json: entry 0 .* and entry 1 .* both have the case id 'P-17'"
    ):
        resolve_datalist(clash, "/data", label_key="mask", source="train.json")
    with pytest.raises(DataError, match="cannot name an output file"):
        resolve_datalist([{**entries[2], "id": "a/b"}], "/data", label_key="mask", source="train.json")


def test_subject_folders_report_a_missing_label_a_missing_channel_and_an_extra_file(tmp_path: Path) -> None:
    subjects = [f"subj_{i:03d}" for i in range(6)]
    files = {"t1": "t1.nii.gz", "t2": "t2.nii.gz", "label": "label.nii.gz"}
    root = make_subject_folders(tmp_path / "subjects", subjects, files)
    (root / "subj_001" / "label.nii.gz").unlink()
    (root / "subj_002" / "t2.nii.gz").unlink()
    (root / "subj_003" / "t1_repeat.nii.gz").write_bytes((root / "subj_003" / "t1.nii.gz").read_bytes())
    (root / "notes").mkdir()  # not a case: nothing in it matches
    (root / "notes" / "protocol.txt").write_text("scanner settings")
    (root / "subj_000" / "._t1.nii.gz").write_text("macOS metadata")  # hidden: never a match
    options = dict(
        root=str(root),
        layout="folder",
        image_pattern=["*/t1*.nii.gz", "*/t2.nii.gz"],
        spatial_size=[16, 16, 8],
        num_workers=0,
        val_fraction=0.34,
        split_path=str(tmp_path / "run" / "split.json"),
        skipped_path=str(tmp_path / "run" / "skipped_cases.json"),
    )
    _, report = SegDataModule(**options).inspect(full=False)
    problems = sorted(str(f) for f in report.errors)
    assert problems == [
        f"{root / 'subj_001'}: has no label (nothing matches data.label_pattern='*/label.nii.gz')",
        f"{root / 'subj_002'}: has no image for channel 1 (nothing matches data.image_pattern[1]='*/t2.nii.gz')",
        f"{root / 'subj_003'}: 2 files match data.image_pattern[0]='*/t1*.nii.gz' (t1.nii.gz, t1_repeat.nii.gz); "
        "a case needs exactly one image for channel 0",
    ]
    assert report.num_cases == 6 and sorted(i.case_id for i in report.infos) == [
        "subj_000",
        "subj_004",
        "subj_005",
    ]
    with pytest.raises(DataError, match="3 problems in 3 of 6 cases"):
        SegDataModule(**options).setup("fit")

    dm = SegDataModule(**{**options, "on_bad_case": "skip"})
    dm.setup("fit")
    assert sorted(c["case_id"] for c in dm.train_cases + dm.val_cases) == ["subj_000", "subj_004", "subj_005"]
    assert next(iter(dm.train_dataloader()))["image"].shape[1] == 2  # one channel per pattern, stacked
    skipped = json.loads((tmp_path / "run" / "skipped_cases.json").read_text())["skipped"]
    assert [s["case_id"] for s in skipped] == ["subj_001", "subj_002", "subj_003"]
    assert "has no label" in skipped[0]["problems"][0] and str(root / "subj_001") in skipped[0]["problems"][0]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == subjects  # the partition still covers every case


def test_deeper_trees_and_patterns_that_find_nothing(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    make_subject_folders(root / "site_a", ["subj_001", "subj_002"])
    make_subject_folders(root / "site_b", ["subj_001"])
    for pattern in ("*/*/img.nii.gz", "**/img.nii.gz", "site_*/subj_*/img.nii.gz"):
        dm = SegDataModule(
            root=str(root), layout="folder", image_pattern=pattern, label_pattern="**/label.nii.gz"
        )
        assert [c["case_id"] for c in dm.read_cases()] == [
            "site_a_subj_001",
            "site_a_subj_002",
            "site_b_subj_001",
        ]
    with pytest.raises(DataError) as err:
        SegDataModule(root=str(root), layout="folder").read_cases()  # the default */img.nii.gz is one level
    assert str(err.value) == (
        f"data.root={root}: no file matches data.image_pattern='*/img.nii.gz' (it holds e.g. "
        "site_a/subj_001/img.nii.gz, site_a/subj_001/label.nii.gz, site_a/subj_002/img.nii.gz, ...; "
        "set data.image_pattern to match one image per case)"
    )
    with pytest.raises(ConfigError, match="the same number of wildcard folders"):
        SegDataModule(root=str(root), layout="folder", image_pattern="*/*/img.nii.gz").read_cases()
    with pytest.raises(ConfigError, match="has no wildcard"):
        SegDataModule(
            root=str(root), layout="folder", image_pattern="site_a/subj_001/img.nii.gz"
        ).read_cases()


def test_a_validation_source_validates_and_everything_else_trains(tmp_path: Path) -> None:
    train = make_subject_folders(tmp_path / "train", ["subj_000", "subj_001", "subj_002"])
    val = make_subject_folders(tmp_path / "val", ["subj_100", "subj_101"])
    split_path = tmp_path / "run" / "split.json"
    options = dict(root=str(train), layout="folder", spatial_size=[16, 16, 8], num_workers=0, cache="none")
    dm = SegDataModule(**options, val_root=str(val), split_path=str(split_path))
    dm.setup("fit")
    assert [c["case_id"] for c in dm.train_cases] == ["subj_000", "subj_001", "subj_002"]
    assert [c["case_id"] for c in dm.val_cases] == ["subj_100", "subj_101"]
    split = json.loads(split_path.read_text())
    assert split["val_source"] == str(val) and split["val"] == ["subj_100", "subj_101"]
    assert len(split["train"]) == 3

    # A datalist validation source is read with the training source's keys (the lab's "mask").
    entries = [
        {"image": str(val / s / "img.nii.gz"), "mask": str(val / s / "label.nii.gz")} for s in ("subj_100",)
    ]
    (tmp_path / "val.json").write_text(json.dumps(entries))
    train_list = [
        {"image": str(train / s / "img.nii.gz"), "mask": str(train / s / "label.nii.gz")}
        for s in ("subj_000", "subj_001")
    ]
    (tmp_path / "train.json").write_text(json.dumps(train_list))
    dm = SegDataModule(
        datalist=str(tmp_path / "train.json"),
        val_datalist=str(tmp_path / "val.json"),
        label_key="mask",
        split_path=None,
    )
    assert [c["case_id"] for c in dm.read_cases()] == ["subj_000", "subj_001", "subj_100"]
    assert [c["case_id"] for c in dm.split(dm.read_cases())[1]] == ["subj_100"]

    with pytest.raises(DataError, match="the validation case 'subj_000' has the id of a training case"):
        SegDataModule(**options, val_root=str(train)).read_cases()
    with pytest.raises(ConfigError, match="data.fold and a validation source"):
        SegDataModule(**options, val_root=str(val), fold=0)


def test_prediction_inputs_follow_the_training_data_settings(tmp_path: Path) -> None:
    plain = tmp_path / "imagesTs"
    plain.mkdir()
    for name in ("case_a_0000", "case_a_0001", "case_b_0000", "case_b_0001"):
        (plain / f"{name}.nii.gz").write_bytes(b"")
    two = list_inputs(plain, channels=2)
    assert [(c.case_id, c.image) for c in two] == [
        ("case_a", [str(plain / "case_a_0000.nii.gz"), str(plain / "case_a_0001.nii.gz")]),
        ("case_b", [str(plain / "case_b_0000.nii.gz"), str(plain / "case_b_0001.nii.gz")]),
    ]
    assert [c.case_id for c in list_inputs(plain)] == [
        "case_a",
        "case_b",
    ]  # channels unknown: the names decide
    # For a one-channel model these are four numbered scans; numbers that are not channels 0000.. neither group.
    assert [c.case_id for c in list_inputs(plain, channels=1)] == [
        p.name[:-7] for p in sorted(plain.iterdir())
    ]
    years = tmp_path / "years"
    years.mkdir()
    for name in ("scan_2020", "scan_2021"):
        (years / f"{name}.nii.gz").write_bytes(b"")
    assert [c.case_id for c in list_inputs(years)] == ["scan_2020", "scan_2021"]

    # Subject folders: found with the trained patterns, one input per folder, labels optional.
    subjects = make_subject_folders(tmp_path / "subjects", ["subj_000", "subj_001", "subj_002"])
    (subjects / "subj_002" / "img.nii.gz").unlink()
    found = list_inputs(subjects, {"layout": "folder", "image_pattern": "*/img.nii.gz"})
    assert [(c.case_id, c.problem is None) for c in found] == [
        ("subj_000", True),
        ("subj_001", True),
        ("subj_002", False),
    ]
    assert found[0].image == str(subjects / "subj_000" / "img.nii.gz")
    assert "subj_002: has no image" in found[2].problem

    # A CSV with the two image columns a model was trained on: both, in order; a missing column is named.
    rows = "subject,t1,t2\ns0,a/t1.nii.gz,a/t2.nii.gz\ns1,b/t1.nii.gz,b/t2.nii.gz\n"
    (tmp_path / "lab.csv").write_text(rows)
    listed = list_inputs(tmp_path / "lab.csv", {"image_key": ["t1", "t2"], "label_key": "mask"})
    assert [(c.case_id, c.image) for c in listed] == [
        ("a", [str(tmp_path / "a" / "t1.nii.gz"), str(tmp_path / "a" / "t2.nii.gz")]),
        ("b", [str(tmp_path / "b" / "t1.nii.gz"), str(tmp_path / "b" / "t2.nii.gz")]),
    ]
    with pytest.raises(DataError, match="rows entry 0 has no 't1' and 'flair' .*trained with"):
        list_inputs(tmp_path / "lab.csv", {"image_key": ["t1", "flair"]})
