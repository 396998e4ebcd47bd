"""Checks of a NIfTI image's geometry and voxels shared by ``prepare`` (every training and test image) and ``infer``
(every input), so that an image one stage refuses is never quietly segmented by the other.

Each check returns one sentence saying what is wrong, or ``None``:

- :func:`affine_problem`: the voxel-to-world matrix has NaN/Inf entries (a NaN origin), a zero column (a spacing of 0,
  for which orientation codes and resampling are undefined) or parallel axes;
- :func:`voxel_problem`: complex or non-numeric voxels, NaN or infinite voxels;
- :func:`resampled_problem`: resampled to the target spacing, the image would be too large to hold (a header whose
  spacing is off by orders of magnitude), predicted from the header before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: largest image (voxels per channel) a stage resamples: 2^31 voxels are 8 GiB of float32 per channel, several times
#: a whole-body CT at its own resolution; beyond that the header's spacing is almost certainly wrong
MAX_RESAMPLED_VOXELS = 2**31
#: smallest voxel side (mm) taken as non-zero
MIN_SPACING_MM = 1e-6


def spacing_of(affine: np.ndarray) -> list[float]:
    """Voxel size in mm along the three array axes: the lengths of the affine's first three columns."""
    return [float(s) for s in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)]


def affine_problem(affine: np.ndarray) -> str | None:
    """Why the 4 × 4 voxel-to-world ``affine`` is unusable, or ``None``."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        bad = "origin" if affine.shape == (4, 4) and np.isfinite(affine[:3, :3]).all() else "matrix"
        return (f"the header's voxel-to-world affine (sform/qform) has NaN or infinite values in its {bad}; fix the "
                "header (e.g. re-export the image)")
    spacing = spacing_of(affine)
    if min(spacing) < MIN_SPACING_MM:
        shown = ", ".join(f"{s:.4g}" for s in spacing)
        return (f"voxel spacing [{shown}] mm has a zero axis (a zero column in the header's sform/qform): the voxels "
                "have no physical size; fix the header's pixdim/srow")
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-6 * math.prod(spacing):
        return "the header's voxel axes are parallel (a singular sform/qform): no orientation; fix the header"
    return None


def voxel_problem(data: np.ndarray, what: str = "image") -> str | None:
    """Why the voxel array ``data`` is unusable (complex, non-numeric, NaN or infinite values), or ``None``."""
    if np.iscomplexobj(data):
        return f"{what} is complex-valued ({data.dtype}); expected real voxel values"
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        return f"{what} has voxels of type {data.dtype}; expected integer or floating-point values"
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            return f"{what} contains {bad} NaN or infinite voxels"
    return None


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[float]:
    """The spatial shape of an image of ``shape`` voxels of ``spacing`` mm resampled to ``target_spacing`` mm."""
    return [n * s / t for n, s, t in zip(shape, spacing, target_spacing)]


def resampled_problem(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
                      limit: int = MAX_RESAMPLED_VOXELS) -> str | None:
    """Why an image of ``shape`` voxels (spatial axes) of ``spacing`` mm cannot be resampled to ``target_spacing`` mm
    (more than ``limit`` voxels per channel), or ``None``."""
    resampled = resampled_shape(shape, spacing, target_spacing)
    voxels = math.prod(max(1.0, r) for r in resampled)
    if voxels <= limit:
        return None
    shown = " × ".join(f"{r:.3g}" for r in resampled)
    source, target = (", ".join(f"{v:.4g}" for v in values) for values in (spacing, target_spacing))
    return (f"resampled from its spacing [{source}] mm to the target spacing [{target}] mm it would be {shown} voxels "
            f"({voxels * 4 / 2**30:.3g} GiB per channel, more than {limit * 4 / 2**30:.0f}); check the voxel size in "
            "the header")
