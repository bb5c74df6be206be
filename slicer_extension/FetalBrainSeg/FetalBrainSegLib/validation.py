"""Checks on a correction before it is sent: it must lie on the image's grid and use only the server's labels.

Why check here when the server checks too: the radiologist learns what is wrong at once, in words about their
case, instead of after an upload; and a correction that fails these checks is never queued for re-sending (it
would be refused again). The server's own validation stays the authority.
"""

from __future__ import annotations

import numpy as np

from .errors import CorrectionInvalidError
from .labels import LabelSet
from .volumeio import Geometry, Volume

#: Geometry tolerance in mm: float32 headers (NIfTI) round positions to ~1e-5 mm; anything larger is a real shift.
GEOMETRY_ATOL_MM = 1e-3


def grid_problems(volume: Volume, image: Geometry, *, atol_mm: float = GEOMETRY_ATOL_MM) -> list[str]:
    """Reasons ``volume`` does not lie voxel for voxel on ``image``'s grid (shape, spacing, orientation, position)."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        return [f"The segmentation must be a 3D volume; it has {array.ndim} dimensions {tuple(array.shape)}."]
    problems = []
    image_shape = tuple(int(s) for s in image.shape[:3])
    if tuple(array.shape) != image_shape:
        problems.append(f"The segmentation has {tuple(array.shape)} voxels but the image has {image_shape}.")
    affine = np.asarray(volume.affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return [*problems, "The segmentation has no valid position in space (its affine is missing or not finite)."]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image_spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    if not np.allclose(spacing, image_spacing, atol=atol_mm):
        problems.append(f"The segmentation's voxel size {_mm(spacing)} differs from the image's {_mm(image_spacing)}.")
    elif not np.allclose(affine[:3, :3], image.affine[:3, :3], atol=atol_mm):
        problems.append("The segmentation is oriented differently from the image (rotated or flipped).")
    shift = float(np.max(np.abs(affine[:3, 3] - image.affine[:3, 3])))
    if shift > atol_mm:
        problems.append(f"The segmentation is shifted by {shift:.3g} mm from the image.")
    return problems


def value_problems(array: np.ndarray, labels: LabelSet) -> list[str]:
    """Reasons the voxel values of ``array`` are not the server's label values (0 = background)."""
    array = np.asarray(array)
    if not array.size:
        return ["The segmentation has no voxels."]
    is_integer = np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
    if not is_integer and (not np.all(np.isfinite(array)) or np.any(array != np.round(array))):
        return ["The segmentation contains non-integer label values."]
    present = set(np.unique(array).astype(np.int64).tolist())
    unknown = sorted(present - {0, *labels.values})
    if unknown:
        return [
            f"The segmentation contains label values {unknown} that are not tissues of this server "
            f"(allowed: 0 = background and {_allowed(labels)})."
        ]
    return []


def correction_problems(
    correction: Volume, image: Geometry, labels: LabelSet, *, atol_mm: float = GEOMETRY_ATOL_MM
) -> list[str]:
    """Every reason ``correction`` cannot be stored as the label of ``image`` (empty list: it can)."""
    problems = grid_problems(correction, image, atol_mm=atol_mm)
    if np.asarray(correction.array).ndim != 3:
        return problems
    values = value_problems(correction.array, labels)
    problems += values
    if not values and not np.any(correction.array):
        problems.append("The correction is empty: every voxel is background.")
    return problems


def validate_correction(
    correction: Volume, image: Geometry, labels: LabelSet, *, atol_mm: float = GEOMETRY_ATOL_MM
) -> np.ndarray:
    """Raise :class:`CorrectionInvalidError` listing every problem; return the array in the smallest label dtype."""
    problems = correction_problems(correction, image, labels, atol_mm=atol_mm)
    if problems:
        raise CorrectionInvalidError(problems)
    dtype = np.uint8 if labels.max_value <= 255 else np.uint16
    return np.asarray(np.round(correction.array) if correction.array.dtype.kind == "f" else correction.array).astype(
        dtype
    )


def _mm(values: np.ndarray) -> str:
    return "x".join(f"{v:.3g}" for v in values) + " mm"


def _allowed(labels: LabelSet) -> str:
    return ", ".join(f"{lab.value} = {lab.display_name}" for lab in labels.labels)
