"""Prediction from DICOM: ``seglight.predict input=<folder | .zip | s3:// prefix of DICOM files>`` predicts every
series that is a volume as one case named by its readable id, reports the others with their reason while the
rest are written, and writes NIfTI masks and/or DICOM SEG objects on the source frames (``output_format``).

The model is a 1x1x1 convolution with fixed weights (``intensity_checkpoint``): foreground exactly where a scan is
bright. The series are written from scans bright exactly where their label is, so each mask must equal the label
voxel for voxel, on the series' converted grid (slices in DICOM's order), and each DICOM SEG frame the label's
slice on its source image.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from seglight.core.errors import ConfigError
from seglight.data.dicom import find_series
from seglight.prediction.cases import predict
from tests.helpers import (
    AXIAL,
    CORONAL,
    S3,
    as_dicom_orders,
    block_label,
    intensity_checkpoint,
    oblique,
    run_cli,
    write_dicom_series,
)

SHAPE = (
    32,
    32,
    16,
)  # twice the checkpoint's 16^3 in-plane: the resizing is exact both ways on the even blocks
GEOMETRIES = {3: AXIAL, 4: CORONAL}  # series number -> the affine its scan was written with
IDS = {number: f"PAT1_20240102_series{number}" for number in (1, 3, 4)}
LOCALIZER_LINE = (
    "PAT1_20240102_series1 (CT series 1 'test series 1', 3 images): a localizer/scout (ImageType LOCALIZER), "
    "not a volume; skipped"
)


def labelled_scan(affine: np.ndarray) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A scan in HU (1000 inside the label, -1000 outside) and its label, on ``affine``."""
    label = block_label(SHAPE)
    image = np.where(label > 0, 1000.0, -1000.0).astype(np.float32)
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)


def expected_mask(number: int) -> nib.Nifti1Image:
    """Series ``number``'s label on its converted grid."""
    return as_dicom_orders(labelled_scan(GEOMETRIES[number])[1])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PACS export: an axial and a coronal series that are volumes, and a localizer of three images."""
    folder = tmp_path_factory.mktemp("study") / "pacs_export"
    for number, affine in GEOMETRIES.items():
        write_dicom_series(folder / f"s{number}", labelled_scan(affine)[0], series_number=number)
    scout, localizer = generate_uid(), ("ORIGINAL", "PRIMARY", "LOCALIZER")
    for index, affine in enumerate((AXIAL, CORONAL, oblique())):
        single = nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), affine)
        write_dicom_series(
            folder / "s1", single, 1, series_uid=scout, image_type=localizer, prefix=f"L{index}"
        )
    return folder


def checkpoint_on(folder: Path, channels: int) -> Path:
    """The intensity model, trained (at learning rate 0) on NIfTI scans of ``channels`` channels."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index, affine in enumerate((AXIAL, CORONAL)):
        image, label = labelled_scan(affine)
        nib.save(image, folder / f"scan{index}.nii.gz")
        nib.save(label, folder / f"label{index}.nii.gz")
        scan = str(folder / f"scan{index}.nii.gz")
        cases.append(
            {"image": scan if channels == 1 else [scan] * channels, "label": str(label.get_filename())}
        )
    names = {0: "background", 1: "liver"}
    return intensity_checkpoint(folder / "liver.ckpt", cases, classes=1, label_names=names)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint_on(tmp_path_factory.mktemp("train"), channels=1)


def assert_masks(output: Path, numbers: list[int]) -> None:
    for number in numbers:
        written, expected = nib.load(output / f"{IDS[number]}.nii.gz"), expected_mask(number)
        assert np.abs(written.affine - expected.affine).max() < 1e-4
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(expected.dataobj)), IDS[number]


def assert_segs(output: Path, study: Path, numbers: list[int]) -> None:
    """Each DICOM SEG references its series and holds the label's slice on each source image, as ``liver``."""
    for number in numbers:
        (series,) = find_series(study / f"s{number}")  # its images in slice order
        seg = hd.seg.segread(output / f"{IDS[number]}.dcm")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
        uids = [str(h.SOPInstanceUID) for h in series.headers]
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
        label = np.asarray(expected_mask(number).dataobj)
        assert np.array_equal(frames, np.stack([label[:, :, k].T for k in range(label.shape[2])]))
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver"]
        assert seg.ManufacturerModelName == "liver.ckpt"


@pytest.mark.slow
def test_a_folder_of_series_predicts_each_volume_and_names_the_localizer(
    study: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masks"
    result = run_cli(
        "seglight.predict",
        f"ckpt={checkpoint}",
        f"input={study}",
        f"output={out}",
        "output_format=[nifti,dicom_seg]",
        "device=cpu",
        cache=tmp_path / "cache",
    )

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        f"seglight.predict: error: 1 of 3 input(s) could not be predicted:\n  {LOCALIZER_LINE}"
        in result.stderr
    )
    assert "Wrote 2 mask(s) (2 as DICOM SEG)" in result.stdout
    log = result.stdout + result.stderr + (out / "predict.log").read_text()
    assert f"[1/2] {IDS[3]}" in log and f"[2/2] {IDS[4]}" in log
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{IDS[3]}.nii.gz", f"{IDS[4]}.nii.gz"]
    assert sorted(p.name for p in out.glob("*.dcm")) == [f"{IDS[3]}.dcm", f"{IDS[4]}.dcm"]
    assert_masks(out, [3, 4])
    assert_segs(out, study, [3, 4])
    # The series were converted into the cache of paths.cache_dir.
    cached = (tmp_path / "cache" / "dicom").glob("*@*/*.nii.gz")
    assert sorted(p.name for p in cached) == [f"{IDS[3]}.nii.gz", f"{IDS[4]}.nii.gz"]


def test_a_zip_and_an_s3_prefix_predict_as_the_folder(
    study: Path, checkpoint: Path, tmp_path: Path, s3: S3
) -> None:
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(study.rglob("*.dcm")):
            zipped.write(path, path.relative_to(study).as_posix())
    url = s3.upload(study, "pacs", "exports/2024")
    cache = tmp_path / "cache"

    from_zip = predict(
        checkpoint, archive, tmp_path / "zip", cache_dir=cache, device="cpu", output_format="dicom_seg"
    )
    from_s3 = predict(checkpoint, url, tmp_path / "s3", cache_dir=cache, device="cpu")

    assert sorted(from_zip.written) == sorted(from_s3.written) == [IDS[3], IDS[4]]
    assert from_zip.failed == from_s3.failed == {IDS[1]: LOCALIZER_LINE}
    assert from_zip.written[IDS[3]] == tmp_path / "zip" / f"{IDS[3]}.dcm"  # DICOM SEG instead of NIfTI
    assert not list((tmp_path / "zip").glob("*.nii.gz"))
    assert_segs(tmp_path / "zip", study, [3, 4])
    assert not from_s3.dicom_seg and not list((tmp_path / "s3").glob("*.dcm"))  # output_format=nifti
    assert_masks(tmp_path / "s3", [3, 4])
    assert (
        cache / "remote" / "s3" / "pacs" / "exports" / "2024"
    ).is_dir()  # fetched through the remote cache


def test_a_model_of_other_channels_names_the_series(study: Path, tmp_path: Path) -> None:
    two_channels = checkpoint_on(tmp_path / "train", channels=2)

    report = predict(two_channels, study / "s3", tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu")

    assert report.failed == {
        IDS[
            3
        ]: f"{IDS[3]} (CT series 3 'test series 3', 16 images): the image has 1 channel(s) but the model "
        "was trained on 2"
    }
    assert not report.written


def test_output_formats_are_checked(study: Path, checkpoint: Path, tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    nib.save(labelled_scan(AXIAL)[0], scan)
    with pytest.raises(ConfigError, match=rf"output_format=dicom_seg: input={scan} holds no DICOM series"):
        predict(checkpoint, scan, tmp_path / "out", device="cpu", output_format=["nifti", "dicom_seg"])
    with pytest.raises(ConfigError, match=r"output_format=png: 'png' is not a format; use nifti, dicom_seg"):
        predict(checkpoint, study, tmp_path / "out", device="cpu", output_format="png")
