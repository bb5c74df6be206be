"""Reading and writing volumes (NIfTI, NRRD, MetaImage, DICOM series) with a RAS affine, whatever the format.

NIfTI goes through nibabel (its affine is already RAS); NRRD/MHA and DICOM series folders go through SimpleITK,
whose LPS direction matrix is converted. Every part of the project (validation, training data, inference, the
MONAI Label app) reads a DICOM series folder through :func:`read_dicom_series`, so they all see the same voxels on
the same grid. Writing is atomic (temp file + rename) so a crash never leaves half a volume behind. Importing this
module makes nibabel use ISA-L for ``.nii.gz`` when ``isal`` is installed (:mod:`fetalseg.data.gzip_codec`).
"""

from __future__ import annotations

import contextlib
import locale
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fetalseg.data import gzip_codec
from fetalseg.plumbing import atomic_path

gzip_codec.install()

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LABEL_MARKERS = ("_dseg", "_seg", "_label", "_labels", "_mask")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_DICOM_FILES = 5000  # files in one series folder: more is not a fetal MRI volume (and would exhaust memory)


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
    """Shape and affine without reading voxel data (cheap validation of big files; a DICOM series is read)."""
    path = Path(path)
    if path.is_dir():
        vol = read_dicom_series(path)
        return tuple(int(s) for s in vol.array.shape), vol.affine
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
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder as ``Volume`` (array indexed x, y, z; affine to RAS mm)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
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


class DicomSeriesError(ValueError):
    """A folder that cannot be read as exactly one DICOM image series; the message says why."""


def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` starts like a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_series(path: str | Path) -> bool:
    """True if ``path`` is a folder whose first files are DICOM (a series exported from a scanner or PACS)."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))[:5]
    return bool(files) and all(is_dicom_file(p) for p in files)


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the locale after GDCM calls: its DICOM code resets LC_CTYPE to "C", which turns Python's default
    text encoding into ASCII for the rest of the process (``open()`` of a UTF-8 JSON file then fails)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def read_dicom_series(folder: str | Path) -> Volume:
    """Read the single DICOM image series in ``folder`` as a Volume (x, y, z array, RAS affine).

    Slices are ordered by position (GDCM's series file sorter), pixel values rescaled by the files' slope and
    intercept, and the grid (origin, spacing, slice direction) taken from the headers. Raises
    :class:`DicomSeriesError` if the folder holds no series, several series, too many files, or a colour image.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    name = folder.name
    if not folder.is_dir():
        raise DicomSeriesError(f"DICOM folder {name}: not a folder")
    n_files = sum(1 for p in folder.iterdir() if p.is_file())
    if n_files > MAX_DICOM_FILES:
        raise DicomSeriesError(f"DICOM folder {name}: {n_files} files; at most {MAX_DICOM_FILES} supported")
    with keep_locale():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise DicomSeriesError(f"DICOM folder {name}: no readable DICOM image series found")
        if len(series) > 1:
            raise DicomSeriesError(f"DICOM folder {name}: holds {len(series)} series; put one series per folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise DicomSeriesError(f"DICOM folder {name}: cannot be read as an image series ({exc})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DicomSeriesError(f"DICOM folder {name}: colour/multi-component images are not MRI volumes")
    array = sitk.GetArrayFromImage(img)  # (z, y, x)
    array = np.transpose(array, tuple(reversed(range(array.ndim))))
    affine = _itk_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetDimension())
    return Volume(array, affine, folder)


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
    with atomic_path(path) as tmp:  # keeps the extension: nibabel picks gzip from it
        nib.save(img, str(tmp))
    return path


def image_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image in ``folder``: the bundle's inference datalist."""
    images = find_images(folder)
    if not images:
        raise FileNotFoundError(f"no images (.nii, .nii.gz, .nrrd, .mha) in {folder}")
    return [{"image": p} for p in images]
