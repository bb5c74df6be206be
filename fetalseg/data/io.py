"""Reading and writing volumes (NIfTI, NRRD, MetaImage) with a RAS affine, whatever the on-disk format.

NIfTI goes through nibabel (its affine is already RAS); NRRD/MHA go through SimpleITK, whose LPS direction matrix
is converted. Writing is atomic (temp file + rename) so a crash never leaves half a volume behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LABEL_MARKERS = ("_dseg", "_seg", "_label", "_labels", "_mask")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A volume in memory: voxel array (x, y, z[, ...]) and its voxel-to-RAS-mm affine."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def suffix_of(path: str | Path) -> str:
    """The image suffix of ``path`` ('' if it is not a supported image file)."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def stem_of(path: str | Path) -> str:
    """File name without its image suffix (``sub-001_T2w.nii.gz`` -> ``sub-001_T2w``)."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def is_label_name(path: str | Path) -> bool:
    """True if the file name marks a segmentation rather than an image (``*_dseg``, ``*_seg``, ...)."""
    return stem_of(path).lower().endswith(LABEL_MARKERS)


def find_images(folder: str | Path) -> list[str]:
    """Image files directly in ``folder`` (not labels), sorted: the datalist of ``inference.json``."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and suffix_of(p) and not is_label_name(p))


def read_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine without reading voxel data (cheap validation of big files)."""
    path = Path(path)
    if suffix_of(path) in NIFTI_SUFFIXES:
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape = tuple(int(s) for s in reader.GetSize())
    return shape, _itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetDimension())


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI/NRRD/MHA file as ``Volume`` (array indexed x, y, z; affine to RAS mm)."""
    path = Path(path)
    suffix = suffix_of(path)
    if not suffix:
        raise ValueError(f"{path.name}: not a supported image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
    if suffix in NIFTI_SUFFIXES:
        img = nib.load(str(path))
        return Volume(np.asarray(img.dataobj), np.asarray(img.affine, dtype=float), path)
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, components)
    spatial = img.GetDimension()
    extra = tuple(range(spatial, array.ndim))
    array = np.transpose(array, (*reversed(range(spatial)), *extra))  # -> (x, y, z[, components])
    affine = _itk_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetDimension())
    return Volume(array, affine, path)


def _itk_affine(spacing, origin, direction, ndim: int) -> np.ndarray:
    n = min(int(ndim), 3)
    direction = np.asarray(direction, dtype=float).reshape(int(ndim), int(ndim))[:n, :n]
    lps = np.eye(4)
    lps[:n, :n] = direction @ np.diag(np.asarray(spacing, dtype=float)[:n])
    lps[:n, 3] = np.asarray(origin, dtype=float)[:n]
    return _LPS_TO_RAS @ lps


def write_nifti(
    array: np.ndarray, affine: np.ndarray, path: str | Path, *, dtype: np.dtype | type | None = None
) -> Path:
    """Write a NIfTI atomically with both qform and sform set (as FeTA files have)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if np.issubdtype(data.dtype, np.integer):
        img.header.set_data_dtype(data.dtype)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def image_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image in ``folder``: the bundle's inference datalist."""
    images = find_images(folder)
    if not images:
        raise FileNotFoundError(f"no images (.nii, .nii.gz, .nrrd, .mha) in {folder}")
    return [{"image": p} for p in images]
