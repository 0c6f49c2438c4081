"""Files: the NIfTI suffixes, the one NIfTI loader and its message, atomic writes.

Every writer of a file a user or another run may read (masks, checkpoints, pictures, JSON and CSV records,
cache entries, downloads) goes through ``atomic_path``: the data is written to a temporary file beside the
target and renamed over it, which POSIX makes atomic, so a reader sees the old file or the new one, never half.
A write that runs out of disk space leaves the old file too, and says so in one line (``DiskFullError``): the
folder, the space the write needs and the space left.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from seglight.core.errors import DataError, DiskFullError, describe_exception

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Temporary files are named ".<name>.<pid>.<random>.partial[.nii.gz]": hidden, so folder listings skip them, and
# recognisable, so a later run can remove what a killed writer left.
PARTIAL_MARKER = ".partial"
# What the OS says when a disk, or the user's quota on it, is full.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``) and is not hidden.

    Hidden names are left out of every folder listing: they are writes in progress (see ``atomic_path``) or
    files of the operating system (``._scan.nii.gz`` from macOS).
    """
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    return name.lower().endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def nifti_stem(path: str | Path) -> str:
    """The file name without its directory and without ``.nii``/``.nii.gz``."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- reading ---------------------------------------------------------------------------------------------------


def unreadable_nifti(path: str | Path, detail: str) -> DataError:
    """The one message for a file that cannot be read as a NIfTI image: ``<path>: not a readable NIfTI image (...)``."""
    return DataError(f"{path}: not a readable NIfTI image ({detail})")


def load_nifti(path: str | Path) -> Any:
    """The NIfTI image at ``path`` (header read, data loaded on access), or a DataError naming the file.

    A missing file, a folder, a file nibabel cannot open and an image of another format (Analyze, MGH...) are
    each refused with one line. Data damaged past the header is found when the data is read (``read_array``).
    """
    import nibabel as nib

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if not p.is_file():
        raise DataError(f"{path}: not a file")
    try:
        image = nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        raise unreadable_nifti(path, describe_exception(exc)) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise unreadable_nifti(path, f"nibabel reads it as {type(image).__name__}, not NIfTI")
    return image


def read_array(image: Any, path: str | Path) -> np.ndarray:
    """The voxels of a loaded image; a truncated or corrupt file fails here, as a DataError naming it."""
    try:
        return np.asanyarray(image.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError: truncated or corrupt data
        raise unreadable_nifti(path, f"truncated or corrupt data: {describe_exception(exc)}") from None


# -- writing ---------------------------------------------------------------------------------------------------


def partial_path(path: str | Path) -> Path:
    """A temporary name beside ``path`` for writing it; NIfTI targets keep their suffix, which nibabel reads."""
    path = Path(path)
    keep = next((s for s in NIFTI_SUFFIXES if path.name.lower().endswith(s)), "")
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_MARKER}{keep}")


@contextmanager
def atomic_path(
    path: str | Path, durable: bool = True, size_hint: int | Callable[[], int] | None = None
) -> Iterator[Path]:
    """A temporary path for a writer (``nib.save``, ``torch.save``, a PNG canvas...), renamed to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. With ``durable`` the data is
    flushed to disk before the rename, and the rename itself after it, so a power cut cannot leave an empty
    file under the final name either. A full disk becomes a ``DiskFullError`` naming the folder and the space
    needed: ``size_hint`` (bytes, or a function that tells them, called only then) when the caller knows it,
    else the size of the file being replaced or what was written before the disk filled, whichever is larger.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        written = _file_size(tmp)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            hint = size_hint() if callable(size_hint) else size_hint
            needed = max(hint or 0, written or 0, _file_size(path) or 0)
            raise disk_full_error(path.parent, needed, f"writing {path.name}") from None
        raise
    if durable:
        _fsync(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_path``); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_partial_files(folder: str | Path, pattern: str = "*") -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` for targets matching ``pattern``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.glob(f".{pattern}.*{PARTIAL_MARKER}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return sorted(removed)


# -- full disks ------------------------------------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception behind it, is the OS saying that the disk or the quota is full.

    Libraries wrap the OS error (``torch.save`` raises a RuntimeError whose context is the OSError), so the
    whole chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free for new files in ``folder`` (its nearest existing parent); None where that cannot be told."""
    current = Path(folder).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        return shutil.disk_usage(current).free
    except OSError:
        return None


def format_bytes(num_bytes: float) -> str:
    """``14.2 MB``, ``1.3 GB``, ``640 kB``: sizes in messages."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= 0.1 * size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes / 1e3:.0f} kB"


def disk_full_error(folder: str | Path, needed: int | None, what: str, advice: str = "") -> DiskFullError:
    """The one message for a full disk: ``<folder>: disk full: <what> needs about <size>, <size> free; ...``."""
    free = free_bytes(folder)
    need = f"needs about {format_bytes(needed)}" if needed else "needs more space"
    left = f", {format_bytes(free)} free" if free is not None else ""
    advice = advice or "free some space there (or write to another disk) and run again"
    return DiskFullError(f"{folder}: disk full: {what} {need}{left}; {advice}")


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _fsync(path: Path) -> None:
    # Best effort: not every platform or filesystem lets a folder (or any file) be synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
