"""Dataset integrity checks, shared by ``python -m seglight.check`` (full) and training start-up (fast).

The fast check reads headers only: files exist and open as NIfTI, image and label agree in shape and affine,
the image has the declared channels, orientations agree. The full check also reads every
voxel: a corrupt or truncated gzip, NaN/Inf values, label values outside the declared labels and all-background
labels are found there. Training runs the fast check at start and the voxel part (``check_case_data``) on each
case when it first reads it, so a bad scan stops a run (or is skipped) with the line the check prints.
"""

from __future__ import annotations

import gzip
import logging
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from seglight.core.errors import DataError, describe_exception
from seglight.core.geometry import same_grid
from seglight.core.io import load_nifti, read_array, unreadable_nifti
from seglight.data.check_report import PERCENTILES, CaseInfo, DatasetReport, Finding, format_shape

log = logging.getLogger("seglight")

MAX_SAMPLED_VOXELS = 2_000_000  # intensity percentiles are estimated from a strided sample
LABEL_CHUNK = 1 << 22  # label voxels counted at a time (bounded temporaries)
BINCOUNT_RANGE = 1 << 16  # label value spans counted with bincount; wider ones are sorted


def case_files(case: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """Every file path a case names under ``keys`` (a multi-channel image may list several)."""
    files: list[str] = []
    for key in keys:
        files.extend(_as_list(case[key]))
    return files


def check_case_data(
    case: Mapping[str, Any],
    labels: Iterable[int] | None = None,
    num_classes: int | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Read every voxel of one case as ``python -m seglight.check`` does; raise DataError with its line if bad.

    Finds corrupt or truncated gzip data (the whole stream is decompressed, so its CRC is verified), NaN/Inf
    values, non-integer label values and label values outside ``labels`` (the declared values) or the model's
    ``num_classes`` (0..num_classes-1). Training runs it on each case when the case is first read or cached.
    """
    allowed = set(labels) if labels else None
    _, findings = _inspect_case(
        0, case, True, allowed, None, dict(names or {}), num_classes=num_classes, statistics=False
    )
    errors = [str(f) for f in findings if f.severity == "error"]
    if errors:
        raise DataError("; ".join(errors))


def inspect_cases(
    cases: Sequence[Mapping[str, Any]],
    full: bool = False,
    labels: Mapping[int, str] | None = None,
    label_values: Iterable[int] | None = None,
    channels: int | None = None,
    names: Mapping[str, str] | None = None,
    workers: int = 1,
    exclude: Collection[int] = (),
    num_classes: int | None = None,
) -> DatasetReport:
    """Check every case (headers only, or every voxel with ``full``) and the dataset as a whole.

    Args:
        cases: dicts with local ``image`` (a path or one path per channel) and ``label`` paths and a ``case_id``.
        full: also read the data: corrupt gzip, NaN/Inf, undeclared label values, all-background labels.
        labels: declared label values and names; ``label_values`` adds values without a name (nnU-Net regions).
        channels: declared number of input channels.
        names: how to name a local file in messages (a downloaded file by its URL).
        workers: threads reading files in parallel (decompression releases the GIL).
        exclude: indices of cases already known to be bad (not fetched), not inspected again.
        num_classes: classes the model predicts (background included); label values beyond them are errors.
    """
    names = dict(names or {})
    allowed = set(labels or {}) | set(label_values or ())
    report = DatasetReport(num_cases=len(cases), full=full, labels=dict(labels or {}))

    def one(index: int) -> tuple[CaseInfo | None, list[Finding]]:
        return _inspect_case(
            index, cases[index], full, allowed or None, channels, names, num_classes=num_classes
        )

    indices = [i for i in range(len(cases)) if i not in set(exclude)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, indices))
    for info, findings in results:
        report.findings.extend(findings)
        if info is not None:
            report.infos.append(info)
    report.findings.extend(_orientation_outliers(cases, report.infos, names))
    if channels is None:
        report.findings.extend(_channel_outliers(cases, report.infos, names))
    return report


# -- one case -----------------------------------------------------------------------------------------------


def _inspect_case(
    index: int,
    case: Mapping[str, Any],
    full: bool,
    allowed: set[int] | None,
    channels: int | None,
    names: Mapping[str, str],
    num_classes: int | None = None,
    statistics: bool = True,
) -> tuple[CaseInfo | None, list[Finding]]:
    findings: list[Finding] = []

    def error(path: str, message: str) -> None:
        findings.append(Finding("error", names.get(path, path), message, index))

    image_paths, label_path = _as_list(case["image"]), str(case["label"])
    opened: dict[str, Any] = {}
    for path in [*image_paths, label_path]:
        img, problem = _open(path)
        if problem:
            error(path, problem)
        else:
            opened[path] = img
    if findings:
        return None, findings

    first = opened[image_paths[0]]
    # Channels: several files of one 3D volume each, or one 3D/4D file with the channels last.
    if len(image_paths) > 1:
        for path in image_paths:
            if len(opened[path].shape) != 3:
                error(
                    path,
                    f"a channel file must hold one 3D volume, got shape {format_shape(opened[path].shape)}",
                )
        n_channels = len(image_paths)
    else:
        shape = first.shape
        if len(shape) == 3:
            n_channels = 1
        elif len(shape) == 4:
            n_channels = shape[3]
        else:
            error(
                image_paths[0],
                f"{len(shape)}D image (shape {format_shape(shape)}); seglight needs 3D volumes, or 4D with the "
                "channels last",
            )
            n_channels = 0
    if channels is not None and n_channels and n_channels != channels:
        error(image_paths[0], f"has {n_channels} channel(s) but the dataset declares {channels}")
    label = opened[label_path]
    if len(label.shape) not in (3, 4) or (len(label.shape) == 4 and label.shape[3] != 1):
        error(label_path, f"a label must be one 3D volume, got shape {format_shape(label.shape)}")
    if findings:
        return None, findings  # comparing the grids of volumes of the wrong dimensionality says nothing more
    # Geometry: every channel file and the label must share the first image's grid.
    reference = image_paths[0]
    for path in [*image_paths[1:], label_path]:
        other = opened[path]
        if tuple(other.shape[:3]) != tuple(first.shape[:3]):
            error(
                path,
                f"shape {format_shape(other.shape[:3])} does not match the image "
                f"{names.get(reference, reference)} ({format_shape(first.shape[:3])})",
            )
        elif not same_grid(other.affine, first.affine):
            diff = float(np.abs(other.affine - first.affine).max())
            error(
                path,
                f"affine differs from the image {names.get(reference, reference)}'s by up to {diff:.4g} "
                "(voxel size, direction or origin); image and label must lie on the same grid",
            )
    info = CaseInfo(
        case_id=str(case.get("case_id", "")),
        shape=tuple(int(s) for s in first.shape[:3]),
        spacing=tuple(round(float(z), 4) for z in first.header.get_zooms()[:3]),
        orientation="".join(nib.aff2axcodes(first.affine)),
        channels=n_channels,
    )
    if findings or not full:
        return info, findings

    # Full check: read every voxel.
    for path in image_paths:
        data = _read(path, opened[path], error)
        if data is None:
            continue
        if _check_finite(path, data, error) and statistics:
            volumes = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
            info.percentiles.extend(_percentiles(v) for v in volumes)
    label_data = _read(label_path, label, error)
    if label_data is not None and _check_finite(label_path, label_data, error):
        _check_labels(label_path, label_data, allowed, num_classes, info, findings, error, names, index)
    return info, findings


def _open(path: str) -> tuple[Any, str | None]:
    """(the image, None), or (None, what is wrong with the file) without the path the finding adds."""
    try:
        return load_nifti(path), None
    except DataError as err:
        return None, str(err).removeprefix(f"{path}: ")


def _read(path: str, img: Any, error: Any) -> np.ndarray | None:
    try:
        if path.endswith(".gz"):
            # Decompress the whole stream, so gzip's CRC check runs: a reader that stops at the data's end
            # would miss damage it decodes into plausible-looking voxels.
            try:
                img = type(img).from_bytes(gzip.decompress(Path(path).read_bytes()))
            except Exception as exc:  # EOFError, zlib.error, OSError: truncated or corrupt gzip data
                raise unreadable_nifti(
                    path, f"truncated or corrupt data: {describe_exception(exc)}"
                ) from None
        return read_array(img, path)
    except DataError as err:
        error(path, str(err).removeprefix(f"{path}: "))
        return None


def _check_finite(path: str, data: np.ndarray, error: Any) -> bool:
    if not np.issubdtype(data.dtype, np.floating):
        return True  # integers cannot hold NaN or Inf
    # One pass without a temporary array: a sum in float64 is finite unless a value is NaN or infinite.
    if math.isfinite(float(np.sum(data, dtype=np.float64))):
        return True
    nan = int(np.isnan(data).sum())
    inf = int(np.isinf(data).sum())
    if nan or inf:
        error(path, f"has {nan} NaN and {inf} infinite voxel values; all values must be finite")
        return False
    return True  # finite values whose float64 sum overflows


def _check_labels(
    path: str,
    data: np.ndarray,
    allowed: set[int] | None,
    num_classes: int | None,
    info: CaseInfo,
    findings: list[Finding],
    error: Any,
    names: Mapping[str, str],
    index: int,
) -> None:
    counts, odd = label_value_counts(data)
    if counts is None:
        error(path, f"has non-integer label values (e.g. {', '.join(f'{v:g}' for v in odd)})")
        return
    info.label_counts = counts
    extra = sorted(set(counts) - allowed) if allowed is not None else []
    if extra:
        error(
            path,
            f"label values {', '.join(map(str, extra))} are not among the declared labels "
            f"({', '.join(map(str, sorted(allowed or ())))})",
        )
    beyond = sorted(v for v in counts if v not in extra and not 0 <= v < (num_classes or 0))
    if num_classes is not None and beyond:
        error(
            path,
            f"label values {', '.join(map(str, beyond))} are outside the model's classes "
            f'0..{num_classes - 1}; declare every label (dataset.json "labels" or data.labels) and keep '
            "model.out_channels=auto",
        )
    if set(counts) <= {0}:
        findings.append(
            Finding("warning", names.get(path, path), "all background (no labelled voxel)", index)
        )


def label_value_counts(data: np.ndarray) -> tuple[dict[int, int] | None, list[float]]:
    """Voxels per label value, or (None, a few offending values) when some values are not whole numbers.

    Works in chunks with ``bincount`` where the values allow it: sorting a whole CT-sized label map (what
    ``np.unique`` does) takes seconds, and converting it to int64 at once would take 8 bytes per voxel.
    """
    flat = np.ravel(data, order="K")  # nibabel's arrays are Fortran-ordered: a view, not a copy
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    counts: Counter[int] = Counter()
    floating = np.issubdtype(flat.dtype, np.floating)
    for start in range(0, flat.size, LABEL_CHUNK):
        chunk = flat[start : start + LABEL_CHUNK]
        if floating:
            rounded = np.round(chunk)
            if not np.array_equal(rounded, chunk):
                return None, [float(v) for v in chunk[rounded != chunk][:3]]
            chunk = rounded
        low, high = int(chunk.min()), int(chunk.max())
        if high - low < BINCOUNT_RANGE:
            binned = np.bincount((chunk - low).astype(np.int64), minlength=high - low + 1)
            counts.update({low + int(v): int(binned[v]) for v in np.flatnonzero(binned)})
        else:
            values, numbers = np.unique(chunk, return_counts=True)
            counts.update({int(v): int(n) for v, n in zip(values, numbers, strict=True)})
    return dict(sorted(counts.items())), []


def _percentiles(volume: np.ndarray) -> list[float]:
    flat = volume.reshape(-1)
    step = max(1, flat.size // MAX_SAMPLED_VOXELS)
    return [round(float(v), 3) for v in np.percentile(flat[::step].astype(np.float64), PERCENTILES)]


# -- across cases -------------------------------------------------------------------------------------------


def _channel_outliers(
    cases: Sequence[Mapping[str, Any]], infos: Sequence[CaseInfo], names: Mapping[str, str]
) -> list[Finding]:
    """Without declared channels, cases whose channel count differs from most cases' cannot be batched."""
    counts = Counter(info.channels for info in infos if info.channels)
    if len(counts) < 2:
        return []
    usual = counts.most_common(1)[0][0]
    by_id = {str(c.get("case_id", "")): (i, _as_list(c["image"])[0]) for i, c in enumerate(cases)}
    return [
        Finding(
            "error",
            names.get(by_id[info.case_id][1], by_id[info.case_id][1]),
            f"has {info.channels} channel(s) but most cases have {usual}; every case needs the same channels",
            by_id[info.case_id][0],
        )
        for info in infos
        if info.channels and info.channels != usual and info.case_id in by_id
    ]


def _orientation_outliers(
    cases: Sequence[Mapping[str, Any]], infos: Sequence[CaseInfo], names: Mapping[str, str]
) -> list[Finding]:
    counts = Counter(info.orientation for info in infos)
    if len(counts) < 2:
        return []
    usual, how_many = counts.most_common(1)[0]
    by_id = {str(c.get("case_id", "")): (i, _as_list(c["image"])[0]) for i, c in enumerate(cases)}
    findings = []
    for info in infos:
        if info.orientation != usual and info.case_id in by_id:
            index, path = by_id[info.case_id]
            findings.append(
                Finding(
                    "warning",
                    names.get(path, path),
                    f"orientation {info.orientation} differs from most cases ({usual}, {how_many} of "
                    f"{len(infos)}); seglight reorients on loading, but check the conversion",
                    index,
                )
            )
    return findings


# -- the summary table ----------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[str]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [str(v) for v in value]
    return [str(value)]
