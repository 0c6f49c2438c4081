"""Files: the NIfTI suffixes, the one NIfTI loader and its message, atomic writes.

Every writer of a file a user or another run may read (masks, checkpoints, pictures, JSON and CSV records,
cache entries, downloads) goes through ``atomic_path``: the data is written to a temporary file beside the
target and renamed over it, which POSIX makes atomic, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from seglight.core.errors import DataError, describe_exception

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Temporary files are named ".<name>.<pid>.<random>.partial[.nii.gz]": hidden, so folder listings skip them, and
# recognisable, so a later run can remove what a killed writer left.
PARTIAL_MARKER = ".partial"


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
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path for a writer (``nib.save``, ``torch.save``, a PNG canvas...), renamed to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. With ``durable`` the data is
    flushed to disk before the rename, and the rename itself after it, so a power cut cannot leave an empty
    file under the final name either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
