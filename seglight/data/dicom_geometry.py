"""Where DICOM pixels are: the checks that make a series' slices one volume, that volume's NIfTI (RAS) affine, and
each pixel of a frame as a voxel of a volume, to write results back onto the frames.

DICOM places every single-frame image in the patient's LPS space: ``ImagePositionPatient`` is the centre of its
first pixel, ``ImageOrientationPatient`` the directions along a row and down a column, ``PixelSpacing`` the
distances between rows and between columns. Slices are ordered by their position along the slice normal (never
by file name or InstanceNumber), and the step between them comes from the positions themselves, so the volume has
exactly the geometry DICOM defines, gantry tilt (a sheared grid) included. The volume's array axes are (column,
row, slice): its first axis runs along a row, as NIfTI's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from seglight.core.errors import DataError

LPS_TO_RAS = np.diag(
    [-1.0, -1.0, 1.0, 1.0]
)  # DICOM's patient axes point left and posterior, NIfTI's right and anterior
# Direction cosines written by different scanners and converters agree to about 1e-5; 1e-4 is the same plane.
ORIENTATION_TOLERANCE = 1e-4
# Slice steps may differ by this share of the spacing (at least MIN_STEP_TOLERANCE_MM) before they count as
# different: positions are decimal strings rounded by the scanner.
STEP_TOLERANCE = 0.01
MIN_STEP_TOLERANCE_MM = 1e-3


class NotAVolume(DataError):
    """Images that cannot be stacked into one volume; the message is the reason, for one line of a report."""


@dataclass(frozen=True)
class FrameGeometry:
    """Where one single-frame image lies in the patient (LPS, mm)."""

    position: np.ndarray  # (3,) centre of the first pixel (row 0, column 0)
    row_direction: np.ndarray  # (3,) unit vector along a row: increasing column index
    column_direction: np.ndarray  # (3,) unit vector down a column: increasing row index
    row_spacing: float  # mm between the centres of adjacent rows
    column_spacing: float  # mm between the centres of adjacent columns
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        """The slice normal (row direction x column direction)."""
        return np.cross(self.row_direction, self.column_direction)


@dataclass(frozen=True)
class VolumeGeometry:
    """How a series' frames stack into a volume: their order, the NIfTI affine and the array shape."""

    order: list[int]  # indices of the given frames, in slice order (array index k)
    affine: np.ndarray  # (4, 4) voxel (column, row, slice) -> RAS mm
    shape: tuple[int, int, int]  # (columns, rows, slices)
    slice_spacing: float  # mm between slices along the normal

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def frame_geometry(header: Any) -> FrameGeometry:
    """The geometry of a single-frame image from its header; NotAVolume naming a missing attribute."""
    missing = [
        name
        for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
        if getattr(header, name, None) in (None, "")
    ]
    if missing:
        raise NotAVolume(f"images without {', '.join(missing)} (no position in the patient)")
    try:
        position = np.asarray([float(v) for v in header.ImagePositionPatient], dtype=np.float64)
        cosines = np.asarray([float(v) for v in header.ImageOrientationPatient], dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    except (TypeError, ValueError) as exc:
        raise NotAVolume(f"images with unreadable geometry ({exc})") from None
    if position.shape != (3,) or cosines.shape != (6,) or min(row_spacing, column_spacing) <= 0:
        raise NotAVolume(
            "images with malformed geometry (ImagePositionPatient needs 3 values, ImageOrientationPatient 6, "
            "PixelSpacing 2 positive ones)"
        )
    row_direction, column_direction = cosines[:3], cosines[3:]
    norms = np.linalg.norm(row_direction), np.linalg.norm(column_direction)
    if min(norms) < 0.5 or abs(float(np.dot(row_direction, column_direction))) > 1e-3 * max(norms) ** 2:
        raise NotAVolume("images whose ImageOrientationPatient is not two perpendicular directions")
    return FrameGeometry(
        position=position,
        row_direction=row_direction / norms[0],
        column_direction=column_direction / norms[1],
        row_spacing=row_spacing,
        column_spacing=column_spacing,
        rows=int(header.Rows),
        columns=int(header.Columns),
    )


def stack_geometry(frames: Sequence[FrameGeometry]) -> VolumeGeometry:
    """Order frames along their normal and check they are one regular volume; NotAVolume says why not."""
    if len(frames) < 2:
        raise NotAVolume("a single image, not a volume (a localizer or a 2D image)")
    first = frames[0]
    orientations = _distinct_orientations(frames)
    if orientations > 1:
        raise NotAVolume(f"images of {orientations} different orientations (mixed orientations)")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise NotAVolume(f"images of different sizes ({listed} pixels)")
    spacings = {(round(f.row_spacing, 4), round(f.column_spacing, 4)) for f in frames}
    if len(spacings) > 1:
        raise NotAVolume(f"images of different pixel spacings ({sorted(spacings)} mm)")
    normal = first.normal
    distances = np.asarray([float(np.dot(f.position, normal)) for f in frames])
    order = [int(i) for i in np.argsort(distances, kind="stable")]
    steps = np.diff(distances[order])
    positive = steps[steps > MIN_STEP_TOLERANCE_MM]
    if positive.size < steps.size:
        raise NotAVolume(
            f"{len(frames)} images at {positive.size + 1} slice positions (several echoes, phases or time "
            "points in one series)"
        )
    spacing = float(np.median(steps))
    tolerance = max(MIN_STEP_TOLERANCE_MM, STEP_TOLERANCE * spacing)
    _check_steps(steps, spacing, tolerance)
    positions = np.stack([frames[i].position for i in order])
    step = (positions[-1] - positions[0]) / (len(order) - 1)
    expected = positions[0] + np.arange(len(order))[:, None] * step
    off_line = float(np.abs(positions - expected).max())
    if off_line > tolerance:
        raise NotAVolume(f"slice positions that are not on one line (off by up to {off_line:.3g} mm)")
    lps = np.eye(4)
    lps[:3, 0] = first.row_direction * first.column_spacing
    lps[:3, 1] = first.column_direction * first.row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return VolumeGeometry(
        order=order,
        affine=LPS_TO_RAS @ lps,
        shape=(first.columns, first.rows, len(order)),
        slice_spacing=spacing,
    )


def _check_steps(steps: np.ndarray, spacing: float, tolerance: float) -> None:
    """NotAVolume for gaps of whole missing slices, then for any other irregular step."""
    multiples = np.rint(steps / spacing)
    gaps = (multiples >= 2) & (np.abs(steps - multiples * spacing) <= tolerance * multiples)
    if gaps.any():
        missing = int((multiples[gaps] - 1).sum())
        where = int(np.flatnonzero(gaps)[0])
        raise NotAVolume(
            f"{missing} missing slice(s): a gap of {steps[where]:.4g} mm after slice {where + 1} where the "
            f"spacing is {spacing:.4g} mm"
        )
    irregular = np.abs(steps - spacing) > tolerance
    if irregular.any():
        raise NotAVolume(
            f"a varying slice spacing (steps from {steps.min():.4g} to {steps.max():.4g} mm); "
            "resample it to one spacing first"
        )


def _distinct_orientations(frames: Sequence[FrameGeometry]) -> int:
    """How many orientations the frames have, those within ``ORIENTATION_TOLERANCE`` of another counted once."""
    seen: list[np.ndarray] = []
    for frame in frames:
        cosines = np.concatenate([frame.row_direction, frame.column_direction])
        if not any(np.abs(cosines - other).max() <= ORIENTATION_TOLERANCE for other in seen):
            seen.append(cosines)
    return len(seen)


def pixel_voxel_coordinates(frame: FrameGeometry, affine: np.ndarray) -> np.ndarray:
    """``(rows, columns, 3)`` continuous voxel coordinates, in the volume of ``affine`` (RAS), of each pixel's centre."""
    rows = np.arange(frame.rows, dtype=np.float64)[:, None, None]
    columns = np.arange(frame.columns, dtype=np.float64)[None, :, None]
    lps = (
        frame.position
        + columns * frame.column_spacing * frame.row_direction
        + rows * frame.row_spacing * frame.column_direction
    )
    ras = lps * LPS_TO_RAS.diagonal()[:3]
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def sample_onto_frame(
    volume: np.ndarray, affine: np.ndarray, frame: FrameGeometry
) -> tuple[np.ndarray, float]:
    """The nearest voxel of ``volume`` (on ``affine``'s grid) at each pixel of ``frame``: ``(rows, columns)``, 0 where
    a pixel lies outside the volume; and how far (in voxels) the farthest pixel centre was from a voxel centre."""
    coordinates = pixel_voxel_coordinates(frame, affine)
    nearest = np.rint(coordinates)
    off_grid = float(np.abs(coordinates - nearest).max()) if coordinates.size else 0.0
    index = nearest.astype(np.int64)
    shape = np.asarray(volume.shape[:3])
    inside = np.all((index >= 0) & (index < shape), axis=-1)
    out = np.zeros((frame.rows, frame.columns), dtype=volume.dtype)
    i, j, k = (index[..., axis][inside] for axis in range(3))
    out[inside] = volume[i, j, k]
    return out, off_grid
