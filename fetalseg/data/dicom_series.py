"""A volume (array indexed x, y, z with a RAS affine) as a DICOM MR image series, one file per slice.

Why: a hospital's images arrive from its PACS as DICOM series, so the PACS round trip is tested on synthetic
cases (:mod:`fetalseg.data.phantom`) turned into what a scanner would send: one MR Image Storage instance per
slice with its position (ImagePositionPatient), the in-plane axes (ImageOrientationPatient), PixelSpacing,
SliceThickness / SpacingBetweenSlices and a linear rescale from stored 16-bit values to the original
intensities. :func:`fetalseg.data.io.read_dicom_series` reads the result back on the same grid (tested).

Geometry: DICOM works in LPS; the RAS affine is flipped on x and y. Array axis 0 runs along the image rows
(the IOP row vector, column index), axis 1 along the columns, axis 2 from slice to slice. Sheared grids (a slice
axis not perpendicular to the slice plane) have no faithful single-frame MR encoding and are refused.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_STORED_MAX = 65535  # uint16 stored values


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def series_geometry(affine: np.ndarray, shape: Sequence[int]) -> dict[str, object]:
    """Spacing, orientation (6 values) and per-slice positions, all LPS, for a volume on ``affine``'s grid."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("affine must be a finite 4x4 matrix")
    lps = _RAS_TO_LPS @ affine
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis (spacing {spacing.tolist()})")
    unit = axes / spacing
    normal = np.cross(unit[:, 0], unit[:, 1])
    if abs(float(unit[:, 0] @ unit[:, 1])) > 1e-4 or abs(abs(float(normal @ unit[:, 2])) - 1.0) > 1e-4:
        raise ValueError("sheared grid: the slice axis must be perpendicular to the slice plane for a DICOM series")
    positions = [lps[:3, 3] + k * axes[:, 2] for k in range(int(shape[2]))]
    return {
        "spacing": spacing,
        "orientation": [*unit[:, 0], *unit[:, 1]],
        "normal": normal,
        "positions": positions,
    }


def volume_to_datasets(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    patient_id: str,
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "T2w fetal brain (synthetic)",
    study_description: str = "Fetal brain MRI (synthetic)",
    series_number: int = 1,
    accession_number: str = "",
) -> list:
    """One ``pydicom.Dataset`` per z slice (MR Image Storage, explicit VR little endian, uint16 + rescale)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise ValueError(f"image must be a 3D array, got shape {image.shape}")
    values = image.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("image holds NaN or infinite values")
    geometry = series_geometry(affine, image.shape)
    low, high = float(values.min()), float(values.max())
    slope = float(_ds((high - low) / _STORED_MAX)) if high > low else 1.0
    intercept = float(_ds(low))
    stored = np.clip(np.rint((values - intercept) / slope), 0, _STORED_MAX).astype(np.uint16)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now(_dt.timezone.utc)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    spacing = geometry["spacing"]
    normal = np.asarray(geometry["normal"])
    out = []
    for k, position in enumerate(geometry["positions"]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientID = patient_id
        ds.PatientName = patient_name or patient_id
        ds.PatientSex = "F"
        ds.PatientBirthDate = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.StudyID = "1"
        ds.AccessionNumber = accession_number
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.SeriesNumber = int(series_number)
        ds.InstanceNumber = k + 1
        ds.Manufacturer = "fetal-fl synthetic"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry["orientation"]]
        ds.SliceLocation = _ds(float(np.asarray(position) @ normal))
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (along axis 1), column spacing (axis 0)
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = axis 1, columns = axis 0
        out.append(ds)
    return out


def write_dicom_series(image: np.ndarray, affine: np.ndarray, folder: str | Path, **tags: object) -> list[Path]:
    """Write :func:`volume_to_datasets` as ``folder/slice0000.dcm``...; returns the file paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(volume_to_datasets(image, affine, **tags)):  # type: ignore[arg-type]
        path = folder / f"slice{k:04d}.dcm"
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    return paths


def rescale_step(image: np.ndarray) -> float:
    """The intensity step of the stored values: a round trip differs from ``image`` by at most half of it."""
    values = np.asarray(image, dtype=np.float64)
    span = float(values.max() - values.min())
    return float(_ds(span / _STORED_MAX)) if span > 0 else 1.0
