"""Check images and labels before anything trains or is stored, with errors a site admin can act on.

Every check names the file and says what is wrong and what was expected. :func:`validate_cases` collects all
problems of a dataset and raises once, so a user fixes their folder in one pass instead of one error per run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fetalseg.data.io import DicomSeriesError, Volume, is_dicom_series, read_dicom_series, read_volume, suffix_of
from fetalseg.labels import label_names, max_label

MIN_EXTENT = 4  # voxels: anything thinner along an axis is a 2D slice (stack), not a volume
AFFINE_ATOL_MM = 1e-3


class DataValidationError(ValueError):
    """One or more inputs are unusable; ``problems`` lists each one in plain words."""

    def __init__(self, problems: Sequence[str], *, context: str = "") -> None:
        self.problems = list(problems)
        head = f"{context}: " if context else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass
class ValidationReport:
    """Problems found (each one a sentence) and how many cases were checked."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self, context: str = "") -> None:
        if self.problems:
            raise DataValidationError(self.problems, context=context)


def load_checked_volume(path: str | Path, *, role: str = "image") -> Volume:
    """Read ``path`` (a file or a DICOM series folder) and check it is one readable 3D scalar volume; raise
    :class:`DataValidationError` if not.

    A trailing singleton 4th axis (``x, y, z, 1``, common in NIfTI exports) is accepted and dropped.
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise DataValidationError([f"{role} {name}: file does not exist ({path})"])
    if path.is_dir():
        if not is_dicom_series(path):
            raise DataValidationError([f"{role} {name}: folder is not a DICOM series"])
        try:
            vol = read_dicom_series(path)
        except DicomSeriesError as exc:
            raise DataValidationError([f"{role} {exc}"]) from exc
        data = np.asarray(vol.array)
        return _checked(vol, data, role=role, name=name)
    if not path.is_file():
        raise DataValidationError([f"{role} {name}: not a file"])
    if path.stat().st_size == 0:
        raise DataValidationError([f"{role} {name}: file is empty (0 bytes)"])
    if not suffix_of(path):
        raise DataValidationError([f"{role} {name}: not a NIfTI/NRRD/MHA image file"])
    try:
        vol = read_volume(path)
        data = np.asarray(vol.array)  # forces decompression: truncated .gz files fail here, not later
    except Exception as exc:  # nibabel/SimpleITK raise many types for corrupt files
        raise DataValidationError([f"{role} {name}: cannot be read as an image ({type(exc).__name__}: {exc})"]) from exc
    return _checked(vol, data, role=role, name=name)


def _checked(vol: Volume, data: np.ndarray, *, role: str, name: str) -> Volume:
    """The 3D scalar volume rules shared by files and DICOM series."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataValidationError(
            [f"{role} {name}: expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}"]
        )
    if min(data.shape) < MIN_EXTENT:
        raise DataValidationError(
            [
                f"{role} {name}: shape {tuple(data.shape)} is a 2D slice, not a 3D volume (every axis needs "
                f">= {MIN_EXTENT} voxels)"
            ]
        )
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise DataValidationError([f"{role} {name}: invalid (singular or non-finite) voxel-to-world affine"])
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise DataValidationError([f"{role} {name}: contains NaN or infinite values"])
    return Volume(data, vol.affine, vol.path)


def check_label_values(label: np.ndarray, *, name: str = "label") -> list[str]:
    """Problems with a label array's values: non-integers or values outside 0..max label."""
    problems = []
    top = max_label()
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.isfinite(label)):
            return [f"{name}: contains NaN or infinite values"]
        if not np.all(np.equal(np.mod(label, 1), 0)):
            problems.append(f"{name}: label values must be whole numbers 0..{top}, found fractional values")
            return problems
    elif not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        return [f"{name}: unsupported label data type {label.dtype}"]
    values = np.unique(label)
    bad = [v for v in values.tolist() if v < 0 or v > top]
    if bad:
        shown = ", ".join(str(int(v)) for v in bad[:10])
        names = ", ".join(f"{k}={v}" for k, v in label_names().items())
        problems.append(f"{name}: label values outside 0..{top}: {shown} (valid labels: {names})")
    return problems


def check_same_space(image: Volume, label: Volume, *, name: str = "label") -> list[str]:
    """Problems if ``label`` is not on ``image``'s voxel grid (shape and affine)."""
    if tuple(image.array.shape[:3]) != tuple(label.array.shape[:3]):
        return [f"{name}: shape {tuple(label.array.shape)} does not match its image {tuple(image.array.shape)}"]
    diff = float(np.max(np.abs(image.affine - label.affine)))
    if diff > AFFINE_ATOL_MM:
        return [
            f"{name}: affine (orientation/spacing/origin) differs from its image's by up to {diff:.4g} mm; "
            "labels must be on the image's voxel grid"
        ]
    return []


def validate_pair(image_path: str | Path, label_path: str | Path | None) -> list[str]:
    """All problems of one image/label pair (empty list if it is fine)."""
    try:
        image = load_checked_volume(image_path, role="image")
    except DataValidationError as exc:
        return exc.problems
    if label_path is None:
        return [f"image {Path(image_path).name}: has no label file"]
    try:
        label = load_checked_volume(label_path, role="label")
    except DataValidationError as exc:
        return exc.problems
    lname = f"label {Path(label_path).name}"
    return check_same_space(image, label, name=lname) + check_label_values(label.array, name=lname)


def validate_cases(cases: Iterable, *, require_labels: bool = True) -> ValidationReport:
    """Validate every case (objects with ``image`` and ``label`` paths); never raises, returns a report."""
    report = ValidationReport()
    for case in cases:
        report.checked += 1
        if case.label is None and not require_labels:
            try:
                load_checked_volume(case.image, role="image")
            except DataValidationError as exc:
                report.problems.extend(exc.problems)
            continue
        report.problems.extend(validate_pair(case.image, case.label))
    if report.checked == 0:
        report.problems.append("no cases found")
    return report
