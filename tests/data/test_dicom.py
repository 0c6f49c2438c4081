"""DICOM series in: real CT series written with pydicom from NIfTI images of known geometry, read back as volumes
equal to those images (shape, affine to 1e-4, values in HU), from a folder, a zip and an s3:// prefix; series that
cannot be volumes skipped with their reason while the others convert."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from seglight import SegDataModule
from seglight.core.errors import DataError
from seglight.data.dicom import dicom_volume, dicom_volumes, find_series, is_dicom_source, series_volume
from seglight.data.dicom_geometry import NotAVolume
from seglight.data.remote import RemoteCache
from seglight.prediction.cases import predict
from tests.helpers import (
    AXIAL,
    CORONAL,
    S3,
    SHAPE,
    TILTED,
    as_dicom_orders,
    hide_package,
    nifti_with_affine,
    oblique,
    run_cli,
    run_command,
    write_dicom_series,
    write_nifti,
)


def read_back(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def quarter_hu(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Values in quarters of a HU, which only a RescaleSlope of 0.25 stores exactly."""
    return nib.Nifti1Image(np.asarray(image.dataobj) / 4.0, image.affine)


@pytest.mark.parametrize(
    "affine, options, dtype",
    [
        pytest.param(AXIAL, {}, np.int16, id="axial"),
        pytest.param(CORONAL, {"slope": 0.5, "intercept": -1000.0}, np.int16, id="coronal-rescaled"),
        pytest.param(
            oblique(), {"slope": 0.25, "intercept": -1000.0}, np.float32, id="oblique-fractional-hu"
        ),
        pytest.param(AXIAL, {"numbers": list(range(16, 0, -1))}, np.int16, id="reversed-file-order"),
        pytest.param(
            AXIAL,
            {"numbers": [5, 12, 1, 9, 16, 3, 14, 7, 2, 11, 6, 15, 4, 8, 13, 10]},
            np.int16,
            id="shuffled",
        ),
        pytest.param(AXIAL @ np.diag([1, 1, -1, 1]), {}, np.int16, id="slices-against-the-normal"),
        pytest.param(TILTED, {}, np.int16, id="tilted-gantry"),
    ],
)
def test_a_series_reads_back_as_the_nifti_it_was_written_from(
    tmp_path: Path, affine: np.ndarray, options: dict, dtype: type
) -> None:
    image = nifti_with_affine(SHAPE, affine)
    if options.get("slope") == 0.25:
        image = quarter_hu(image)
    write_dicom_series(tmp_path / "series", image, **options)

    result = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache")

    assert not result.skipped
    ((case_id, path),) = result.volumes.items()
    assert case_id == "PAT1_20240102_series3"
    data, got_affine = read_back(path)
    expected = as_dicom_orders(image)
    assert data.shape == SHAPE
    assert np.abs(got_affine - expected.affine).max() < 1e-4
    assert data.dtype == dtype  # whole HU fit int16; fractions stay float32
    assert np.array_equal(data, np.asarray(expected.dataobj))  # in HU: the rescale applied
    # MONAI reads the cached volume with the same geometry (the sform; a sheared grid has no qform).
    header = nib.load(path).header
    assert int(header["sform_code"]) == 1
    assert int(header["qform_code"]) == (0 if affine is TILTED else 1)


def test_monai_pydicom_reader_stacks_by_instance_number_not_position(tmp_path: Path) -> None:
    """Why seglight orders slices itself: MONAI's PydicomReader places the voxels as this reader does while
    InstanceNumber follows the slice positions (either way along them), and stacks slices out of place when it
    does not."""
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    image = nifti_with_affine(SHAPE, AXIAL)
    load = LoadImage(reader=PydicomReader(), image_only=True)
    numbering = {
        "ascending": list(range(1, 17)),
        "descending": list(range(16, 0, -1)),
        "shuffled": [5, 12, 1, 9, 16, 3, 14, 7, 2, 11, 6, 15, 4, 8, 13, 10],
    }
    agrees = {}
    for name, numbers in numbering.items():
        write_dicom_series(tmp_path / name, image, numbers=numbers)
        ours = read_back(dicom_volumes(tmp_path / name, cache_dir=tmp_path / "cache").volumes.popitem()[1])
        assert np.array_equal(ours[0], np.asarray(image.dataobj)) and np.abs(ours[1] - AXIAL).max() < 1e-4
        monai = load(str(tmp_path / name))
        theirs = as_dicom_orders(nib.Nifti1Image(np.asarray(monai), np.asarray(monai.affine)))
        agrees[name] = bool(
            np.array_equal(np.asarray(theirs.dataobj), ours[0])
            and np.abs(theirs.affine - ours[1]).max() < 1e-4
        )
    assert agrees == {"ascending": True, "descending": True, "shuffled": False}


def test_one_folder_of_several_series_converts_the_volumes_and_names_what_it_skips(tmp_path: Path) -> None:
    folder = tmp_path / "pacs_export"
    image = nifti_with_affine(SHAPE, AXIAL)
    write_dicom_series(folder / "s3", image, series_number=3)
    write_dicom_series(folder / "s4", nifti_with_affine(SHAPE, CORONAL, seed=1), series_number=4)
    # A localizer: three single images of different orientations, marked LOCALIZER.
    scout = generate_uid()
    for number, affine in enumerate((AXIAL, CORONAL, oblique())):
        single = nib.Nifti1Image(np.zeros((20, 18, 1), np.float32), affine)
        localizer = ("ORIGINAL", "PRIMARY", "LOCALIZER")
        write_dicom_series(
            folder / "s1", single, 1, series_uid=scout, image_type=localizer, prefix=f"L{number}"
        )
    missing = write_dicom_series(folder / "s5", image, series_number=5)
    missing[7].unlink()
    varying = write_dicom_series(folder / "s6", image, series_number=6)
    for path in varying[10:]:  # every slice from the 11th on 0.7 mm further: one step of 3.2 mm among 2.5 mm
        shift_position(path, 0.7)
    write_dicom_series(folder / "s7", image, series_number=7, sop_class="1.2.840.10008.5.1.4.1.1.7")
    mixed = generate_uid()
    write_dicom_series(folder / "s8", image.slicer[:, :, :8], 8, series_uid=mixed, prefix="A")
    write_dicom_series(
        folder / "s8", nib.Nifti1Image(np.zeros((20, 18, 8)), CORONAL), 8, series_uid=mixed, prefix="C"
    )
    write_dicom_series(folder / "s9", image.slicer[:, :, :1], series_number=9)
    echoes = generate_uid()
    for echo in ("E1", "E2"):
        write_dicom_series(folder / "s10", image, series_number=10, series_uid=echoes, prefix=echo)
    enhanced = write_dicom_series(
        folder / "s11", image.slicer[:, :, :2], series_number=11, sop_class="1.2.840.10008.5.1.4.1.1.2.1"
    )
    for path in enhanced:  # Enhanced CT keeps a whole volume in one file of many frames
        dataset = pydicom.dcmread(path)
        dataset.NumberOfFrames = 8
        dataset.save_as(path)
    (folder / "README.txt").write_text("exported from the PACS\n")

    result = dicom_volumes(folder, cache_dir=tmp_path / "cache")

    assert sorted(result.volumes) == ["PAT1_20240102_series3", "PAT1_20240102_series4"]
    data, _ = read_back(result.volumes["PAT1_20240102_series3"])
    assert np.array_equal(data, np.asarray(image.dataobj))
    reasons = {case.rsplit("series", 1)[1]: why for case, why in result.skipped.items()}
    assert "a localizer/scout (ImageType LOCALIZER)" in reasons["1"]
    assert "1 missing slice(s): a gap of 5 mm after slice 7 where the spacing is 2.5 mm" in reasons["5"]
    assert "a varying slice spacing (steps from 2.5 to 3.2 mm)" in reasons["6"]
    assert "a secondary capture (Secondary Capture Image Storage)" in reasons["7"]
    assert "images of 2 different orientations (mixed orientations)" in reasons["8"]
    assert "a single image, not a volume" in reasons["9"]
    assert "32 images at 16 slice positions (several echoes" in reasons["10"]
    assert "multi-frame images (Enhanced CT Image Storage), which seglight does not read yet" in reasons["11"]
    assert sorted(reasons) == ["1", "10", "11", "5", "6", "7", "8", "9"]
    # Each line names the series, so a user can find it.
    assert result.skipped["PAT1_20240102_series5"].startswith(
        "PAT1_20240102_series5 (CT series 5 'test series 5', 15 images): 1 missing slice(s)"
    )
    with pytest.raises(NotAVolume, match="missing slice"):
        series_volume(result.series["PAT1_20240102_series5"], tmp_path / "cache")


def shift_position(path: Path, mm: float) -> None:
    """Move an image along z (LPS) by ``mm``, as a scanner's irregular step would."""
    dataset = pydicom.dcmread(path)
    x, y, z = (float(v) for v in dataset.ImagePositionPatient)
    dataset.ImagePositionPatient = [x, y, round(z + mm, 4)]
    dataset.save_as(path)


def test_a_localizer_stored_in_the_volume_series_is_left_out(tmp_path: Path) -> None:
    image = nifti_with_affine(SHAPE, AXIAL)
    uid = generate_uid()
    write_dicom_series(tmp_path / "series", image, series_uid=uid)
    scout = nib.Nifti1Image(np.zeros((20, 18, 1), np.float32), CORONAL)
    localizer = ("ORIGINAL", "PRIMARY", "LOCALIZER")
    write_dicom_series(tmp_path / "series", scout, series_uid=uid, image_type=localizer, prefix="SCOUT")

    (series,) = find_series(tmp_path / "series")

    assert series.problem is None and [Path(f).name for f in series.left_out] == ["SCOUT0001.dcm"]
    data, affine = read_back(series_volume(series, tmp_path / "cache"))
    assert np.array_equal(data, np.asarray(image.dataobj)) and np.abs(affine - AXIAL).max() < 1e-4


def test_case_ids_are_readable_and_unique(tmp_path: Path) -> None:
    image = nifti_with_affine(SHAPE, AXIAL)
    write_dicom_series(tmp_path / "a", image, patient_id="Doe, Jane/7", series_number=2)
    # Two studies of one day with the same series number: the SeriesInstanceUID tells them apart.
    write_dicom_series(tmp_path / "b", image, patient_id="P2", study_uid=generate_uid())
    write_dicom_series(tmp_path / "c", image, patient_id="P2", study_uid=generate_uid())

    ids = [s.case_id for s in find_series(tmp_path)]

    assert ids[0] == "Doe_Jane_7_20240102_series2"
    assert ids[1].startswith("P2_20240102_series3_") and ids[2].startswith("P2_20240102_series3_")
    assert len(set(ids)) == 3


def test_zip_and_s3_sources_read_as_the_folder(tmp_path: Path, s3: S3) -> None:
    folder = tmp_path / "study"
    write_dicom_series(folder / "axial", nifti_with_affine(SHAPE, AXIAL), series_number=3)
    write_dicom_series(folder / "coronal", nifti_with_affine(SHAPE, CORONAL, seed=2), series_number=4)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*.dcm")):
            zipped.write(path, path.relative_to(folder).as_posix())
    url = s3.upload(folder, "dicom-bucket", "study")
    store = RemoteCache(tmp_path / "remote")
    cache = tmp_path / "cache"

    local = dicom_volumes(folder, cache_dir=cache)
    for other in (dicom_volumes(archive, cache_dir=cache), dicom_volumes(url, store, cache_dir=cache)):
        assert (
            sorted(other.volumes)
            == sorted(local.volumes)
            == ["PAT1_20240102_series3", "PAT1_20240102_series4"]
        )
        for case, path in other.volumes.items():
            data, affine = read_back(path)
            want_data, want_affine = read_back(local.volumes[case])
            assert np.array_equal(data, want_data) and np.allclose(affine, want_affine, atol=1e-6)
    assert is_dicom_source(folder) and is_dicom_source(archive) and is_dicom_source(url, store)
    write_nifti(tmp_path / "niftis" / "scan.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert not is_dicom_source(tmp_path / "niftis")


def test_the_cache_reuses_a_conversion_until_the_files_change(tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path / "series", nifti_with_affine(SHAPE, AXIAL))
    first = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache").volumes.popitem()[1]
    written = first.stat().st_mtime_ns

    again = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache").volumes.popitem()[1]
    assert again == first and again.stat().st_mtime_ns == written

    stat = files[3].stat()
    os.utime(files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a file of the series replaced
    changed = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache").volumes.popitem()[1]
    assert changed != first and changed.is_file() and not first.parent.exists()  # the old version pruned


def test_a_folder_without_dicom_is_one_clear_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "niftis" / "scan.nii.gz", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "niftis" / "notes.txt").write_text("no DICOM here")
    with pytest.raises(DataError, match=r"niftis: holds no DICOM series \(2 file\(s\) looked at\)"):
        find_series(tmp_path / "niftis")
    with pytest.raises(DataError, match="no such file or folder"):
        find_series(tmp_path / "nowhere")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip file"):
        find_series(tmp_path / "broken.zip", cache_dir=tmp_path / "cache")


def test_without_pydicom_the_error_names_the_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    write_dicom_series(tmp_path / "series", nifti_with_affine(SHAPE, AXIAL))
    hide_package(tmp_path, monkeypatch, "pydicom")
    code = (
        "from seglight.core.errors import reported_errors\n"
        "from seglight.data.dicom import dicom_volumes\n"
        "with reported_errors('seglight'):\n"
        f"    dicom_volumes({str(tmp_path / 'series')!r})\n"
    )
    result = run_command([sys.executable, "-c", code])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        'seglight: error: reading DICOM needs pydicom, which is not installed: pip install "seglight[dicom]"'
    ]
    shutil.rmtree(tmp_path / "blocked")


def test_a_series_folder_is_one_volume_as_a_datalist_entry_needs(tmp_path: Path) -> None:
    image = nifti_with_affine(SHAPE, AXIAL)
    write_dicom_series(tmp_path / "study" / "ct", image, series_number=3)
    files = write_dicom_series(tmp_path / "study" / "broken", image, series_number=4)
    files[4].unlink()

    data, _ = read_back(dicom_volume(tmp_path / "study" / "ct", cache_dir=tmp_path / "cache"))
    assert np.array_equal(data, np.asarray(image.dataobj))
    with pytest.raises(DataError, match=r"broken: holds no DICOM series that is a volume \(.*missing slice"):
        dicom_volume(tmp_path / "study" / "broken", cache_dir=tmp_path / "cache")
    write_dicom_series(tmp_path / "study" / "ct", image, series_number=5, prefix="B")
    with pytest.raises(
        DataError, match=r"ct: holds 2 series that are volumes .*; give the folder of one series"
    ):
        dicom_volume(tmp_path / "study" / "ct", cache_dir=tmp_path / "cache")


# -- training data from DICOM: a datalist whose image entries are series folders ---------------------------------


def dicom_datalist(root: Path, patients: int = 4) -> Path:
    """``root/patient_<i>/ct/`` (a coronal CT series) with ``label.nii.gz`` beside it on the series' grid, and
    ``root/train.json`` naming them (paths relative to it)."""
    entries = []
    for number in range(patients):
        image = nifti_with_affine(SHAPE, CORONAL, seed=number)
        label = np.zeros(SHAPE, np.uint8)
        label[2:8, 3:9, 2:6] = 1  # the bright cube
        write_dicom_series(root / f"patient_{number}" / "ct", image, patient_id=f"P{number}")
        nib.save(
            as_dicom_orders(nib.Nifti1Image(label, CORONAL)), root / f"patient_{number}" / "label.nii.gz"
        )
        entries.append({"image": f"patient_{number}/ct", "label": f"patient_{number}/label.nii.gz"})
    datalist = {"labels": {"0": "background", "1": "cube"}, "training": entries}
    (root / "train.json").write_text(json.dumps(datalist))
    return root / "train.json"


@pytest.mark.slow
def test_training_from_a_datalist_of_series_folders(tmp_path: Path) -> None:
    datalist = dicom_datalist(tmp_path / "data")
    run = tmp_path / "run"

    result = run_cli(
        "seglight.train",
        "data=datalist",
        f"data.datalist={datalist}",
        "data.spatial_size=[16,16,8]",
        "data.num_workers=0",
        "model.init_filters=8",
        "trainer.max_epochs=1",
        "logger=none",
        f"hydra.run.dir={run}",
        cache=tmp_path / "cache",
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "DICOM series: 4 of 4 converted to NIfTI volumes" in (run / "train.log").read_text()
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"patient_{n}" for n in range(4)]
    converted = sorted((tmp_path / "cache" / "dicom").glob("*@*/*.nii.gz"))
    assert sorted(p.name for p in converted) == [f"P{n}_20240102_series3.nii.gz" for n in range(4)]
    # Prediction reads the datalist the model was trained on as training did: the same cases, the same grids.
    report = predict(
        run / "checkpoints" / "last.ckpt",
        datalist,
        tmp_path / "masks",
        device="cpu",
        output_format=["nifti", "dicom_seg"],
        cache_dir=tmp_path / "cache",
    )
    assert sorted(report.written) == sorted(report.dicom_seg) == [f"patient_{n}" for n in range(4)]
    assert not report.failed
    (series,) = find_series(datalist.parent / "patient_0" / "ct")
    seg = pydicom.dcmread(report.dicom_seg["patient_0"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    for number in range(4):
        mask, label = (
            nib.load(report.written[f"patient_{number}"]),
            nib.load(datalist.parent / f"patient_{number}" / "label.nii.gz"),
        )
        assert mask.shape == label.shape and np.abs(mask.affine - label.affine).max() < 1e-4


def test_the_check_names_the_series_folder_that_is_no_volume_or_whose_label_is_off_its_grid(
    tmp_path: Path,
) -> None:
    datalist = dicom_datalist(tmp_path / "data", patients=3)
    sorted((tmp_path / "data" / "patient_1" / "ct").glob("*.dcm"))[4].unlink()  # a missing slice
    off_grid = tmp_path / "data" / "patient_2" / "label.nii.gz"
    label = nib.load(off_grid)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine @ np.diag([1, 1, -1, 1])), off_grid)
    data = SegDataModule(
        datalist=str(datalist),
        num_workers=0,
        dicom_cache_dir=str(tmp_path / "cache"),
        spatial_size=[16, 16, 8],
    )

    # The network is sized from the first series' geometry, as from a NIfTI scan's header (before setup): in RAS,
    # 20 x 16 x 18 voxels of 0.7 x 2 x 0.9 mm, resized to 16 x 16 x 8.
    assert data.network_input().spacing == pytest.approx([0.7 * 20 / 16, 2.0 * 16 / 16, 0.9 * 18 / 8])

    _, report = data.inspect()

    errors = {f.path: f.message for f in report.findings if f.severity == "error"}
    series = str(tmp_path / "data" / "patient_1" / "ct")
    assert errors[series].startswith(
        "holds no DICOM series that is a volume (P1_20240102_series3 (CT series 3 'test series 3', 15 images): "
        "1 missing slice(s)"
    )
    # The integrity check compares the label with the converted volume, and names the series folder.
    assert errors[str(off_grid)].startswith(
        f"affine differs from the image {tmp_path / 'data' / 'patient_2' / 'ct'}'s"
    )
    assert sorted(errors) == sorted([series, str(off_grid)])
