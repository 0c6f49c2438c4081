"""Dataset integrity checks that run before training, so a bad file fails fast with its name."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib

from seglight.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def case_files(case: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """Every file path a case names under ``keys`` (a multi-channel image may list several)."""
    files: list[str] = []
    for key in keys:
        value = case[key]
        if isinstance(value, Sequence) and not isinstance(value, str):
            files.extend(str(v) for v in value)
        else:
            files.append(str(value))
    return files


def check_readable(path: str) -> None:
    """Raise DataError unless ``path`` exists and has a NIfTI header nibabel can read (data is not read)."""
    if "://" in path:
        return  # remote objects are checked once fetched
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if not p.is_file():
        raise DataError(f"{path}: not a file")
    try:
        nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for foreign or damaged files
        kind = "not a NIfTI file" if not path.endswith(NIFTI_SUFFIXES) else "not a readable NIfTI image"
        raise DataError(
            f"{path}: {kind} ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        ) from None


def check_cases_readable(cases: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """The fast pre-training check: every listed file exists and opens as NIfTI. Reports all bad files at once."""
    problems: list[str] = []
    for case in cases:
        for path in case_files(case, keys):
            try:
                check_readable(path)
            except DataError as err:
                problems.append(str(err))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} dataset files cannot be used:\n  " + "\n  ".join(problems))
