"""DICOM SEG out: masks on a series' converted NIfTI grid written as DICOM Segmentation objects with highdicom,
read back with highdicom onto the source frames, with the right labels, codes, colours and algorithm."""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from seglight.core.errors import DataError
from seglight.data.dicom import dicom_volumes, find_series
from seglight.prediction.dicom_seg import seglight_version, write_dicom_seg
from seglight.prediction.predictor import Predictor
from tests.helpers import (
    AXIAL,
    CORONAL,
    SHAPE,
    as_dicom_orders,
    hide_package,
    nifti_with_affine,
    oblique,
    run_command,
    tiny_checkpoint,
    write_dicom_series,
)

LABELS = {0: "background", 1: "liver", 2: "tumour", 3: "blob"}


def cubes(shape: tuple[int, ...]) -> np.ndarray:
    """Three labelled boxes (1, 2, 3), none symmetric, so a flipped or transposed frame would not match."""
    mask = np.zeros(shape, np.uint8)
    mask[2:8, 3:9, 2:6] = 1
    mask[10:15, 4:7, 8:13] = 2
    mask[16:18, 12:17, 1:3] = 3
    return mask


def source_frames(seg: hd.seg.Segmentation, uids: list[str]) -> np.ndarray:
    """The SEG's label map on the given source images, ``(images, rows, columns)``."""
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)


@pytest.mark.parametrize(
    "affine",
    [
        pytest.param(AXIAL, id="axial"),
        pytest.param(CORONAL, id="coronal"),
        pytest.param(oblique(), id="oblique"),
        pytest.param(AXIAL @ np.diag([1, 1, -1, 1]), id="slices-against-the-normal"),
    ],
)
def test_a_mask_on_the_converted_grid_reads_back_on_the_source_frames(
    tmp_path: Path, affine: np.ndarray
) -> None:
    write_dicom_series(tmp_path / "series", nifti_with_affine(SHAPE, affine))
    converted = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache")
    ((case_id, path),) = converted.volumes.items()
    series = converted.series[case_id]
    volume = nib.load(path)
    mask = cubes(volume.shape)

    written = write_dicom_seg(
        mask, volume.affine, series, tmp_path / "out" / f"{case_id}.dcm", LABELS, "last"
    )

    seg = hd.seg.segread(written)
    source = series.headers[0]
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.SegmentationType == "BINARY"
    assert (
        seg.StudyInstanceUID == source.StudyInstanceUID
        and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    )
    assert seg.PatientID == "PAT1" and seg.SeriesNumber == 1003 and seg.SeriesInstanceUID != series.uid
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.uid
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(uids)
    # Frame k of the converted volume is source image k: the SEG holds the mask's slice on it, rows first.
    expected = np.stack([mask[:, :, k].T for k in range(mask.shape[2])])
    assert np.array_equal(source_frames(seg, uids), expected)
    # Each frame of the SEG names the source image it lies on.
    for item in seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = item.DerivationImageSequence
        assert str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID) in uids
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {n: str(s.SegmentLabel) for n, s in segments.items()} == {1: "liver", 2: "tumour", 3: "blob"}
    described = {
        n: (
            s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
        for n, s in segments.items()
    }
    assert described == {
        1: ("Anatomical Structure", "10200004"),  # SNOMED-CT Liver
        2: ("Morphologically Abnormal Structure", "108369006"),  # SNOMED-CT Neoplasm / tumour
        3: ("Tissue", "85756007"),  # a name SNOMED-CT does not have here: the generic Tissue
    }
    colours = {tuple(s.RecommendedDisplayCIELabValue) for s in segments.values()}
    assert len(colours) == 3
    for segment in segments.values():
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("seglight", seglight_version())
    assert seg.ManufacturerModelName == "last" and seg.SoftwareVersions == f"seglight {seglight_version()}"


def test_a_mask_on_another_grid_of_the_same_scan_maps_by_position(tmp_path: Path) -> None:
    """A mask drawn on the NIfTI the series was written from, whose slices run against the DICOM normal, lands on
    the source frames by position, not by index."""
    image = nifti_with_affine(SHAPE, AXIAL @ np.diag([1, 1, -1, 1]))
    write_dicom_series(tmp_path / "series", image)
    (series,) = find_series(tmp_path / "series")
    mask = cubes(image.shape)

    written = write_dicom_seg(mask, image.affine, series, tmp_path / "seg.dcm", LABELS)

    as_converted = np.asarray(as_dicom_orders(nib.Nifti1Image(mask, image.affine)).dataobj)
    expected = np.stack([as_converted[:, :, k].T for k in range(mask.shape[2])])
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    assert np.array_equal(source_frames(hd.seg.segread(written), uids), expected)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


def test_a_series_predicts_as_its_nifti_and_its_mask_returns_as_dicom_seg(
    checkpoint: Path, tmp_path: Path
) -> None:
    """The whole way a DICOM series will take through seglight: converted, predicted by the NIfTI machinery
    unchanged (the same mask as the NIfTI it was written from), and written back onto its frames."""
    image = nifti_with_affine(SHAPE, oblique())
    nib.save(image, tmp_path / "scan.nii.gz")
    write_dicom_series(tmp_path / "series", image)
    converted = dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache")
    ((case_id, volume),) = converted.volumes.items()
    predictor = Predictor(checkpoint, device="cpu")

    result = predictor.predict_case(str(volume))

    from_nifti = predictor.predict_case(str(tmp_path / "scan.nii.gz"))
    assert np.array_equal(result.mask, from_nifti.mask) and result.mask.any()
    labels = predictor.models[0].task()["label_names"]
    series = converted.series[case_id]
    written = write_dicom_seg(
        result.mask, result.reference.affine, series, tmp_path / f"{case_id}.dcm", labels
    )
    seg = hd.seg.segread(written)
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    expected = np.stack([result.mask[:, :, k].T for k in range(result.mask.shape[2])])
    assert np.array_equal(source_frames(seg, uids), expected)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [labels[1]]


def test_an_empty_mask_still_names_every_label(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "series", nifti_with_affine(SHAPE, AXIAL))
    (series,) = find_series(tmp_path / "series")
    volume = nib.load(dicom_volumes(tmp_path / "series", cache_dir=tmp_path / "cache").volumes.popitem()[1])

    written = write_dicom_seg(
        np.zeros(volume.shape, np.uint8), volume.affine, series, tmp_path / "seg.dcm", LABELS
    )

    seg = hd.seg.segread(written)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "tumour", "blob"]
    uids = [str(h.SOPInstanceUID) for h in series.headers]
    assert not source_frames(seg, uids).any()


def test_what_cannot_be_written_is_one_clear_error(tmp_path: Path) -> None:
    image = nifti_with_affine(SHAPE, AXIAL)
    files = write_dicom_series(tmp_path / "series", image)
    files[5].unlink()
    (broken,) = find_series(tmp_path / "series")
    with pytest.raises(DataError, match=r"1 missing slice\(s\).*; no DICOM SEG can be made for it"):
        write_dicom_seg(cubes(SHAPE), AXIAL, broken, tmp_path / "seg.dcm", LABELS)
    write_dicom_series(tmp_path / "good", image)
    (good,) = find_series(tmp_path / "good")
    with pytest.raises(DataError, match=r"the mask has shape \(20, 18\); a DICOM SEG needs a 3D label map"):
        write_dicom_seg(np.zeros((20, 18)), AXIAL, good, tmp_path / "seg.dcm", LABELS)
    assert not (tmp_path / "seg.dcm").exists()


def test_without_highdicom_the_error_names_the_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    write_dicom_series(tmp_path / "series", nifti_with_affine(SHAPE, AXIAL))
    hide_package(tmp_path, monkeypatch, "highdicom")
    code = (
        "import numpy as np\n"
        "from seglight.core.errors import reported_errors\n"
        "from seglight.data.dicom import find_series\n"
        "from seglight.prediction.dicom_seg import write_dicom_seg\n"
        "with reported_errors('seglight'):\n"
        f"    (series,) = find_series({str(tmp_path / 'series')!r})\n"
        f"    write_dicom_seg(np.zeros((20, 18, 16)), np.eye(4), series, {str(tmp_path / 'seg.dcm')!r})\n"
    )
    result = run_command([sys.executable, "-c", code])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        'seglight: error: writing DICOM SEG needs highdicom, which is not installed: pip install "seglight[dicom]"'
    ]
