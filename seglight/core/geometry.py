"""Voxel geometry shared by every reader: spacing from an affine, and when two affines describe the same grid."""

from __future__ import annotations

from typing import Any

import numpy as np

# Two images share a grid when their affines agree to this (mm, and direction cosines): NIfTI stores float32,
# so a scan and a mask written by different tools differ in the last digits.
AFFINE_TOLERANCE = 1e-3


def spacing_from_affine(affine: Any) -> np.ndarray:
    """Voxel size (mm) along each array axis: the lengths of the affine's columns; ``(..., 3)`` for ``(..., 4, 4)``.

    Right for oblique scans too, and after reorientation, resampling and resizing (MONAI updates the affine in
    each of them). Takes NumPy arrays, torch tensors and batches of either.
    """
    if hasattr(affine, "detach"):  # a torch tensor or MetaTensor affine
        affine = affine.detach().cpu().double().numpy()
    a = np.asarray(affine, dtype=np.float64)
    dims = a.shape[-1] - 1
    return np.linalg.norm(a[..., :dims, :dims], axis=-2)


def same_grid(a: Any, b: Any) -> bool:
    """Whether two affines place their voxels alike (within ``AFFINE_TOLERANCE``)."""
    return bool(
        np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=AFFINE_TOLERANCE)
    )
