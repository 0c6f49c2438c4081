"""DICOM series -> NIfTI volumes in seglight's cache, so every NIfTI reader, transform and check applies unchanged.

A source is a folder (searched to any depth), an ``s3://`` prefix (listed and fetched through ``RemoteCache``) or a
``.zip`` (extracted once into the cache). Its files' headers are read in parallel with pydicom (pixel data left
on disk) and grouped by SeriesInstanceUID: each series is one case, named by a readable, safe, unique id
(PatientID, StudyDate, SeriesNumber). A series that cannot be one volume (a localizer, mixed orientations,
missing slices, a varying spacing, a secondary capture, multi-frame or colour images...) keeps a one-line
``problem`` and is skipped; the others convert. Geometry is ``seglight.data.dicom_geometry``'s: slices ordered
along their normal, the affine DICOM defines, in RAS. RescaleSlope/Intercept (the modality LUT) is applied, so CT
is in Hounsfield units.

Converted volumes live in ``<cache>/dicom/<SeriesInstanceUID>@<where>-<version>/<case id>.nii.gz``: ``where``
hashes the files' paths, ``version`` their sizes and modification times, so a changed series converts again (its
old entry removed), an unchanged one is a cache hit, and copies of a series in several places do not evict each
other. ``python -m seglight.cache`` lists and prunes these entries (kind ``dicom``), never those a running process
has used: reading a source takes a lease on the cache (``seglight.data.caching.files.hold``).
pydicom is an optional dependency: ``pip install "seglight[dicom]"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from seglight.core.errors import ConfigError, DataError, describe_exception
from seglight.core.io import atomic_path, is_nifti, partial_path
from seglight.data.caching.files import hold, record_use
from seglight.data.datalists import IMAGE, assign_case_ids, safe_name
from seglight.data.dicom_geometry import (
    FrameGeometry,
    NotAVolume,
    VolumeGeometry,
    frame_geometry,
    stack_geometry,
)
from seglight.data.remote import RemoteCache, default_cache_dir, glob_escape, is_remote, join_path

log = logging.getLogger("seglight")

INSTALL_HINT = 'pip install "seglight[dicom]"'
HEADER_THREADS = 8  # header reads wait on the disk or the network more than on the CPU
CONVERTER_VERSION = 1  # bump when a converted volume would differ, so older cache entries are not reused
# Image storage classes that hold one slice per file with a position in the patient.
VOLUME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.128": "PET",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1-.4 variants: pictures, without patient geometry
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # the index of a DICOM medium, not an image
INT16 = np.iinfo(np.int16)


def require_pydicom() -> Any:
    """The pydicom module; a ConfigError naming the extra to install when it is missing."""
    try:
        import pydicom
    except ImportError:
        raise ConfigError(f"reading DICOM needs pydicom, which is not installed: {INSTALL_HINT}") from None
    return pydicom


@dataclass
class DicomSeries:
    """One series of a source: its case id, its files and headers (in slice order once it is a volume), and the
    geometry it stacks into, or the ``problem`` that keeps it from being a volume."""

    uid: str  # SeriesInstanceUID
    case_id: str
    files: list[str]  # local paths
    headers: list[Any]  # pydicom Datasets without pixel data, in the order of ``files``
    geometry: VolumeGeometry | None = None
    problem: str | None = None
    left_out: list[str] = field(default_factory=list)  # files of the series not in the volume (localizers)

    @property
    def first_file(self) -> str:
        """A file of the series, to name it in messages."""
        return self.files[0]

    def describe(self) -> str:
        """``<case id> (CT series 3 'ABDOMEN', 120 images)``, for messages."""
        header = self.headers[0]
        modality = str(getattr(header, "Modality", "") or "DICOM")
        number = getattr(header, "SeriesNumber", None)
        text = f"{modality} series" + (f" {number}" if number not in (None, "") else "")
        title = str(getattr(header, "SeriesDescription", "") or "").strip()
        if title:
            text += f" {title!r}"
        count = len(self.files) + len(self.left_out)
        return f"{self.case_id} ({text}, {count} image{'s' if count != 1 else ''})"

    def frames(self) -> list[FrameGeometry]:
        """Each file's frame geometry, in the order of ``files``."""
        return [frame_geometry(h) for h in self.headers]


@dataclass
class DicomVolumes:
    """What a source converted to: a NIfTI file per volume, every series by case id, and why others were skipped."""

    volumes: dict[str, Path]
    series: dict[str, DicomSeries]
    skipped: dict[str, str]  # case id -> one line naming the series and the reason


def dicom_volumes(
    source: str | Path,
    store: RemoteCache | None = None,
    cache_dir: str | Path | None = None,
    log_skipped: bool = True,
) -> DicomVolumes:
    """Every series of ``source`` that is a volume, converted (or found in the cache) as NIfTI; the others skipped
    with their reason, logged as warnings unless the caller reports them itself (``log_skipped=False``)."""
    found = find_series(source, store, cache_dir)
    result = DicomVolumes(volumes={}, series={s.case_id: s for s in found}, skipped={})
    for series in found:
        try:
            if series.problem is not None:
                raise NotAVolume(series.problem)
            result.volumes[series.case_id] = series_volume(series, cache_dir)
        except DataError as exc:
            result.skipped[series.case_id] = f"{series.describe()}: {exc}; skipped"
            if log_skipped:
                log.warning("%s", result.skipped[series.case_id])
    return result


def dicom_volume(
    source: str | Path, store: RemoteCache | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The NIfTI volume of a folder (prefix, zip) that holds one series: a datalist's image entry that is a series
    folder. A DataError when it holds no volume, or several series that are."""
    return one_series(source, store, cache_dir)[1]


def one_series(
    source: str | Path, store: RemoteCache | None = None, cache_dir: str | Path | None = None
) -> tuple[DicomSeries, Path]:
    """The one series of a folder (prefix, zip) that is a volume, and that volume (``dicom_volume``)."""
    converted = dicom_volumes(source, store, cache_dir, log_skipped=False)  # the error below says why
    if len(converted.volumes) == 1:
        ((case_id, volume),) = converted.volumes.items()
        return converted.series[case_id], volume
    if not converted.volumes:
        reasons = "; ".join(line.removesuffix("; skipped") for line in converted.skipped.values())
        raise DataError(f"{source}: holds no DICOM series that is a volume ({reasons})")
    raise DataError(
        f"{source}: holds {len(converted.volumes)} series that are volumes ({', '.join(converted.volumes)}); "
        "give the folder of one series"
    )


def is_series_entry(path: str | Path) -> bool:
    """Whether a datalist's image entry names a DICOM series to convert rather than a NIfTI file: a local folder, a
    ``.zip``, or an ``s3://`` prefix (a URL that does not end in ``.nii``/``.nii.gz``)."""
    text = str(path)
    if text.lower().endswith(".zip"):
        return True
    if is_remote(text):
        return not is_nifti(text)
    return Path(text).expanduser().is_dir()


def entry_volumes(
    paths: Sequence[str], store: RemoteCache | None = None, cache_dir: str | Path | None = None
) -> tuple[dict[str, tuple[DicomSeries, Path]], dict[str, str]]:
    """The series and NIfTI volume of each image entry that is a series folder (``one_series``), and the problem
    of each that holds no single volume (one line naming the entry), as ``RemoteCache.fetch_all`` gives fetched
    files."""
    converted: dict[str, tuple[DicomSeries, Path]] = {}
    problems: dict[str, str] = {}
    for path in dict.fromkeys(paths):
        try:
            converted[path] = one_series(path, store, cache_dir)
        except DataError as exc:
            problems[path] = str(exc)
    return converted, problems


def find_series(
    source: str | Path,
    store: RemoteCache | None = None,
    cache_dir: str | Path | None = None,
    workers: int = HEADER_THREADS,
) -> list[DicomSeries]:
    """Every DICOM series of a folder, ``s3://`` prefix or ``.zip``, sorted by case id, each checked.

    Files that are not DICOM (a README, a DICOMDIR index) are passed over. A DataError when ``source`` holds no
    DICOM image at all.
    """
    pydicom = require_pydicom()
    store = store or RemoteCache()
    hold(dicom_cache_dir(cache_dir))  # pruning keeps the conversions and zips this process uses
    files = source_files(source, store, cache_dir)
    headers: dict[str, Any] = {}
    unreadable: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        for path, header in zip(files, pool.map(lambda f: _read_header(pydicom, f), files), strict=True):
            if isinstance(header, str):
                unreadable.append(f"{path} ({header})")
            elif header is not None and getattr(header, "SeriesInstanceUID", None):
                headers[path] = header
    for line in unreadable[:5]:
        log.warning("%s: a damaged DICOM file, left out", line)
    if not headers:
        raise DataError(
            f"input={source}: holds no DICOM series ({len(files)} file(s) looked at"
            + (f", {len(unreadable)} of them damaged" if unreadable else "")
            + "); give a folder, s3:// prefix or .zip of DICOM files"
        )
    grouped: dict[str, list[str]] = defaultdict(list)
    for path, header in headers.items():
        grouped[str(header.SeriesInstanceUID)].append(path)
    found = []
    for uid, paths in grouped.items():
        paths.sort()
        series = DicomSeries(uid=uid, case_id="", files=paths, headers=[headers[p] for p in paths])
        _check(series)
        found.append(series)
    _name(found, str(source))
    return sorted(found, key=lambda s: s.case_id)


def _read_header(pydicom: Any, path: str) -> Any:
    """The file's header without pixel data; None when it is not DICOM; a string saying why for a damaged one."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        return None
    except Exception as exc:  # truncated or corrupt: pydicom raises several types
        return describe_exception(exc)


def _check(series: DicomSeries) -> None:
    """Set ``series.geometry`` (and its slice order), or ``series.problem`` when it cannot be one volume."""
    classes = {str(getattr(h, "SOPClassUID", "")) for h in series.headers}
    if DICOMDIR_CLASS in classes:
        classes.discard(DICOMDIR_CLASS)
    names = ", ".join(sorted(_class_name(c) for c in classes))
    if any(c.startswith(SECONDARY_CAPTURE) for c in classes):
        series.problem = f"a secondary capture ({names}): pictures without a position in the patient"
        return
    frames = [int(getattr(h, "NumberOfFrames", 1) or 1) for h in series.headers]
    if max(frames) > 1:
        series.problem = (
            f"multi-frame images ({names}), which seglight does not read yet; export single-frame images"
        )
        return
    unsupported = sorted(c for c in classes if c not in VOLUME_CLASSES)
    if unsupported:
        series.problem = f"{names}: not a CT, MR or PET image series"
        return
    colour = {str(getattr(h, "PhotometricInterpretation", "")) for h in series.headers}
    if any(int(getattr(h, "SamplesPerPixel", 1) or 1) > 1 for h in series.headers):
        series.problem = f"colour images ({', '.join(sorted(colour))}), not a grey-level volume"
        return
    localizer = [_is_localizer(h) for h in series.headers]
    if all(localizer):
        series.problem = "a localizer/scout (ImageType LOCALIZER), not a volume"
        return
    if any(localizer):  # a scout stored in the series of the volume it planned: leave it out
        series.left_out = [f for f, scout in zip(series.files, localizer, strict=True) if scout]
        kept = [
            (f, h) for f, h, scout in zip(series.files, series.headers, localizer, strict=True) if not scout
        ]
        series.files, series.headers = [f for f, _ in kept], [h for _, h in kept]
    try:
        geometry = stack_geometry(series.frames())
    except NotAVolume as exc:
        series.problem = str(exc)
        return
    series.files = [series.files[i] for i in geometry.order]
    series.headers = [series.headers[i] for i in geometry.order]
    series.geometry = replace(
        geometry, order=list(range(len(geometry.order)))
    )  # files are in slice order now


def _is_localizer(header: Any) -> bool:
    image_type = getattr(header, "ImageType", None) or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else f"SOP class {uid or 'missing'}"


def _name(found: list[DicomSeries], source: str) -> None:
    """Readable, safe, unique case ids: ``<PatientID>_<StudyDate>_series<SeriesNumber>``, with a short hash of
    the SeriesInstanceUID for series those leave alike."""
    bases = []
    for series in found:
        header = series.headers[0]
        parts = [
            str(getattr(header, "PatientID", "") or "").strip(),
            str(getattr(header, "StudyDate", "") or ""),
        ]
        number = getattr(header, "SeriesNumber", None)
        parts.append(f"series{number}" if number not in (None, "") else "")
        bases.append(safe_name("_".join(p for p in parts if p)) if any(parts) else "series")
    for series, base in zip(found, bases, strict=True):
        alike = bases.count(base) > 1
        series.case_id = f"{base}_{hashlib.sha1(series.uid.encode()).hexdigest()[:6]}" if alike else base
    # The dataset's one naming rule checks them: safe as file names and unique.
    cases = [{"case_id": s.case_id, IMAGE: s.first_file} for s in found]
    assign_case_ids(cases, f"input={source}")


# -- the files of a source -----------------------------------------------------------------------------------


def source_files(source: str | Path, store: RemoteCache, cache_dir: str | Path | None = None) -> list[str]:
    """Local paths of every file of a folder, ``s3://`` prefix (fetched) or ``.zip`` (extracted), sorted."""
    text = str(source)
    if is_remote(text):
        if not store.exists(text):
            raise DataError(f"input={source}: no such object or prefix")
        hold(store.cache_dir)  # pruning keeps the files fetched here while they are converted
        if text.lower().endswith(".zip"):
            return source_files(store.fetch(text), store, cache_dir)
        urls = [join_path(text, relative) for relative in store.find(text)]
        fetched, problems = store.fetch_all(urls)
        if problems:
            first = next(iter(problems.values()))
            raise DataError(f"input={source}: {len(problems)} file(s) could not be fetched, e.g. {first}")
        return sorted(str(fetched[u]) for u in urls)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"input={source}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".zip":
        path = extracted_zip(path, cache_dir)
    if path.is_file():
        return [str(path.resolve())]
    root = path.resolve()
    return [str(root / relative) for relative in store.find(root)]


def extracted_zip(path: Path, cache_dir: str | Path | None = None) -> Path:
    """The folder a zip file is extracted into in the cache, extracted now unless this version is there already."""
    stat = path.stat()
    key = _key([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    target = dicom_cache_dir(cache_dir) / "zip" / f"{safe_name(path.stem)}@{key}"
    if target.is_dir():
        record_use(next((f for f in target.rglob("*") if f.is_file()), target))  # one file dates the entry
        return target
    partial = partial_path(target)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(partial)  # member names are made safe: none lands outside the folder
        partial.rename(target)
    except zipfile.BadZipFile as exc:
        raise DataError(f"input={path}: not a readable zip file ({exc})") from None
    except OSError:
        if not target.is_dir():  # not another process that extracted it first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def dicom_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted volumes and extracted zips go: ``cache_dir``, else ``<seglight's cache>/dicom``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "dicom"


def is_dicom_file(path: str | Path) -> bool:
    """Whether a local file starts as a DICOM file does (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_source(source: str | Path, store: RemoteCache | None = None, sample: int = 20) -> bool:
    """Whether a folder, ``s3://`` prefix, zip or file holds DICOM files (judged by its first few files)."""
    store = store or RemoteCache()
    text = str(source)
    if text.lower().endswith(".zip"):
        local = store.fetch(text) if is_remote(text) else Path(text).expanduser()
        try:
            with zipfile.ZipFile(local) as archive:
                members = [m for m in archive.infolist() if not m.is_dir()][:sample]
                return any(archive.open(m).read(132)[128:132] == b"DICM" for m in members)
        except (OSError, zipfile.BadZipFile):
            return False
    if is_remote(text):
        names = [n for n in store.find(text) if not n.lower().endswith((".nii", ".nii.gz", ".json", ".csv"))]
        return any(is_dicom_file(store.fetch(join_path(text, n))) for n in names[:3])
    path = Path(text).expanduser()
    if path.is_file():
        return is_dicom_file(path)
    if not path.is_dir():
        return False
    return any(is_dicom_file(path / relative) for relative in store.find(path, limit=sample))


# -- conversion ------------------------------------------------------------------------------------------------


def series_volume(series: DicomSeries, cache_dir: str | Path | None = None) -> Path:
    """The series as a NIfTI file in the cache (converted now unless this version of its files is there)."""
    if series.geometry is None:
        raise NotAVolume(series.problem or "not checked as a volume")
    stats = [os.stat(path) for path in series.files]
    # Where the files are, then which version of them: a copy elsewhere keeps its own entry, and a changed
    # series replaces only the entry of its own files.
    where = _key([series.uid, series.files])
    version = _key([CONVERTER_VERSION, [[s.st_size, s.st_mtime_ns] for s in stats]])
    folder = dicom_cache_dir(cache_dir) / f"{safe_name(series.uid)}@{where}-{version}"
    target = folder / f"{series.case_id}.nii.gz"
    if target.is_file():
        record_use(target)
        return target
    image = nib.Nifti1Image(_read_volume(series), series.geometry.affine)
    image.set_sform(series.geometry.affine, code=1)  # scanner coordinates
    if _orthogonal(series.geometry.affine):
        image.set_qform(series.geometry.affine, code=1)
    else:  # a tilted gantry's sheared grid: only the sform can say it
        image.set_qform(None, code=0)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(target) as tmp:
        nib.save(image, tmp)
    for sibling in folder.parent.glob(f"{glob_escape(folder.name.rsplit('-', 1)[0])}-*"):
        if sibling != folder and sibling.is_dir():  # older versions of these files
            shutil.rmtree(sibling, ignore_errors=True)
    log.info("%s: converted to %s", series.describe(), target)
    return target


def _read_volume(series: DicomSeries) -> np.ndarray:
    """The series' pixels in modality units (HU for CT), ``(columns, rows, slices)``: int16 when they fit, else
    float32."""
    pydicom = require_pydicom()
    from pydicom.pixels import apply_modality_lut

    def read(path: str) -> np.ndarray:
        try:
            dataset = pydicom.dcmread(path)
            return np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float64).T
        except Exception as exc:  # missing decoder plugins, truncated pixel data...
            raise DataError(f"{path}: its pixel data cannot be decoded ({describe_exception(exc)})") from None

    with ThreadPoolExecutor(max_workers=max(1, min(HEADER_THREADS, len(series.files)))) as pool:
        slices = list(pool.map(read, series.files))
    volume = np.stack(slices, axis=-1)
    if tuple(volume.shape) != tuple(series.geometry.shape if series.geometry else ()):
        raise NotAVolume(f"pixel data of shape {volume.shape[:2]} where the headers say otherwise")
    whole = np.array_equal(volume, np.rint(volume))
    if whole and volume.min() >= INT16.min and volume.max() <= INT16.max:
        return volume.astype(np.int16)
    return volume.astype(np.float32)


def _orthogonal(affine: np.ndarray) -> bool:
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.allclose(columns.T @ columns, np.eye(3), atol=1e-6))


def _key(parts: Sequence[Any]) -> str:
    return hashlib.sha1(json.dumps(list(parts), default=str).encode()).hexdigest()[:10]
