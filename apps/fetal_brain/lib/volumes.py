"""Read and check what users send or drop in: NIfTI, NRRD, Slicer ``.seg.nrrd`` and DICOM series folders.

The core reads and checks files and DICOM series folders (:mod:`fetalseg.data.io`, :mod:`fetalseg.data.validation`);
this module adds what only the app meets: Slicer segmentations whose segment values differ from ours, cropped
segmentations placed back on their image's grid, and cheap header-only checks so the inference path does not read
a 256³ volume twice. Every failure is an
:class:`~apps.fetal_brain.lib.errors.UnprocessableError` naming the file and what is wrong.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from apps.fetal_brain.lib.errors import UnprocessableError
from fetalseg.data.io import (
    DicomSeriesError,
    Volume,
    is_dicom_series,
    read_header,
    suffix_of,
)
from fetalseg.data.io import read_dicom_series as core_read_dicom_series
from fetalseg.data.validation import (
    MIN_EXTENT,
    DataValidationError,
    check_label_values,
    check_same_space,
    load_checked_volume,
)
from fetalseg.labels import all_labels, max_label

log = logging.getLogger(__name__)

SEG_NRRD = ".seg.nrrd"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

is_dicom_dir = is_dicom_series  # the app's name for the core check (kept for its callers)


def read_dicom_series(folder: str | Path) -> Volume:
    """The core's DICOM series reader (:func:`fetalseg.data.io.read_dicom_series`), failures as 422."""
    try:
        return core_read_dicom_series(folder)
    except DicomSeriesError as exc:
        raise UnprocessableError(str(exc)) from exc


def _check_volume(vol: Volume, *, role: str, name: str) -> Volume:
    """The core's 3D-volume rules on a header-only volume (shape + affine, no voxels read)."""
    data = vol.array
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        shape = tuple(data.shape)
        raise UnprocessableError(f"{role} {name}: expected a 3D volume, got {data.ndim}D with shape {shape}")
    if min(data.shape) < MIN_EXTENT:
        raise UnprocessableError(
            f"{role} {name}: shape {tuple(data.shape)} is a 2D slice, not a 3D volume "
            f"(every axis needs >= {MIN_EXTENT} voxels)"
        )
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise UnprocessableError(f"{role} {name}: invalid (singular or non-finite) voxel-to-world affine")
    return Volume(data, vol.affine, vol.path)


def load_image(path: str | Path, *, role: str = "image") -> Volume:
    """Read and check one image (file or DICOM folder); raise :class:`UnprocessableError` with the reason."""
    try:
        return load_checked_volume(path, role=role)  # files and DICOM series folders, read by the core
    except DataValidationError as exc:
        raise UnprocessableError(exc.problems) from exc


def image_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine of an image without reading its voxels where the format allows (NIfTI, NRRD)."""
    path = Path(path)
    if path.is_dir():
        vol = read_dicom_series(path)
        return tuple(vol.array.shape), vol.affine
    try:
        return read_header(path)
    except Exception as exc:  # nibabel/SimpleITK raise many types for corrupt headers
        raise UnprocessableError(f"image {path.name}: cannot be read ({type(exc).__name__}: {exc})") from exc


def check_image_header(path: str | Path) -> None:
    """Cheap pre-inference check (header only): a readable 3D volume with a valid affine."""
    path = Path(path)
    if path.is_dir():
        return  # DICOM series are fully checked when they enter the datastore
    if not suffix_of(path):
        raise UnprocessableError(f"image {path.name}: not a NIfTI/NRRD image file")
    shape, affine = image_geometry(path)
    spatial = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    _check_volume(Volume(np.broadcast_to(np.uint8(0), spatial), affine, path), role="image", name=path.name)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def _segment_value(segment: dict) -> int | None:
    """Our label value for a Slicer segment, matched by name (machine or display name), else None."""
    wanted = _normalise(str(segment.get("name", "")))
    for lab in all_labels():
        if wanted in (_normalise(lab.name), _normalise(lab.display_name)):
            return lab.value
    return None


def read_seg_nrrd(path: str | Path) -> Volume:
    """A Slicer ``.seg.nrrd`` as one label map in our values (segments matched by name, else by label value)."""
    import slicerio

    path = Path(path)
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many types for corrupt files
        raise UnprocessableError(f"label {path.name}: cannot be read as a Slicer segmentation ({exc})") from exc
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 4:
        raise UnprocessableError(
            f"label {path.name}: segments overlap (several layers); export the segmentation as a label map"
        )
    label = np.zeros(voxels.shape, dtype=np.uint8)
    top = max_label()
    for segment in seg.get("segments", []):
        stored = int(segment.get("labelValue", 0))
        value = _segment_value(segment)
        if value is None:
            value = stored
            if not 0 <= value <= top:
                raise UnprocessableError(
                    f"label {path.name}: segment {segment.get('name')!r} (value {stored}) is not one of the FeTA "
                    f"tissues and its value is outside 0..{top}"
                )
        label[voxels == stored] = value
    affine = _LPS_TO_RAS @ np.asarray(seg["ijkToLPS"], dtype=float)
    return Volume(label, affine, path)


def _embed(label: Volume, shape: tuple[int, ...], affine: np.ndarray) -> Volume | None:
    """Place a cropped label (same axes and spacing, integer voxel offset) into the image grid, else None."""
    if not np.allclose(label.affine[:3, :3], affine[:3, :3], atol=1e-4):
        return None
    offset = np.linalg.solve(affine[:3, :3], label.affine[:3, 3] - affine[:3, 3])
    start = np.round(offset).astype(int)
    if not np.allclose(offset, start, atol=1e-3):
        return None
    end = start + np.asarray(label.array.shape[:3])
    if np.any(start < 0) or np.any(end > np.asarray(shape[:3])):
        return None
    out = np.zeros(shape[:3], dtype=label.array.dtype)
    out[start[0] : end[0], start[1] : end[1], start[2] : end[2]] = label.array
    return Volume(out, affine.copy(), label.path)


def load_label_for(image_path: str | Path, label_path: str | Path) -> np.ndarray:
    """Read a label, check it lies on its image's grid with values 0..7; return it as uint8 on that grid.

    A Slicer segmentation cropped to its segments' extent is placed back into the image grid when the two grids
    are aligned; anything else off the grid is rejected (labels are never resampled behind the user's back).
    """
    label_path = Path(label_path)
    if label_path.name.lower().endswith(SEG_NRRD):
        label = read_seg_nrrd(label_path)
        if label.array.ndim != 3 or min(label.array.shape) < 1:
            raise UnprocessableError(f"label {label_path.name}: expected a 3D segmentation")
    else:
        label = load_image(label_path, role="label")
    shape, affine = image_geometry(image_path)
    shape = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    if len(shape) != 3:
        raise UnprocessableError(f"image {Path(image_path).name}: is not a 3D volume (shape {shape})")
    name = f"label {label_path.name}"
    if tuple(label.array.shape) != tuple(shape) and label_path.name.lower().endswith(SEG_NRRD):
        label = _embed(label, shape, affine) or label
    grid = Volume(np.broadcast_to(np.uint8(0), shape), affine)  # shape+affine only: no voxels read
    problems = check_same_space(grid, label, name=name) + check_label_values(np.asarray(label.array), name=name)
    if problems:
        raise UnprocessableError(problems)
    return np.asarray(label.array).astype(np.uint8)
