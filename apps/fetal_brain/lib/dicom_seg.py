"""FeTA label maps as DICOM SEG objects on their source MR series, and back.

Why DICOM SEG: it is what a PACS stores and every DICOM viewer (Slicer, OHIF, the PACS's own) shows as a
segmentation of the series it references. One segment per FeTA tissue, named and coloured from the bundle's labels
(:func:`fetalseg.labels.foreground_labels`; colours as CIELab, as the standard wants), each frame referencing
the source slice it lies on, the geometry (orientation, spacing, per-frame position) taken from the source series.

Library: ``pydicom-seg`` 0.4.1 (works with pydicom 2.4, which MONAI Label 0.8.5 needs, and is already installed
with MONAI Label, whose own DICOM SEG path uses it). ``highdicom`` 0.22.0 would also accept pydicom 2.4.5 (its
metadata requires ``pydicom>=2.3,!=2.4.0``; newer releases not checked) but adds ``pillow-jpls``: not needed here.
Empty tissues are not written (a SEG segment needs at least one frame); an all-background label
map has no DICOM SEG form and raises :class:`EmptySegmentationError`.

Coded concepts: each segment's category and type codes are the bundle's (``label_codes`` in its metadata.json, read
by :mod:`fetalseg.labels`; SNOMED CT / FMA codes of DICOM CID 7153 and 7140), so a viewer or a query can tell
cortex from white matter by code, not only by name. A label without codes in the bundle is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apps.fetal_brain.lib.errors import UnprocessableError
from fetalseg.data.io import keep_locale
from fetalseg.labels import foreground_labels

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CONTENT_LABEL = "FETAL_BRAIN"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
TAG_DESCRIPTIONS = {"original": "model result", "final": "correction"}
# written into ContentDescription when a radiologist confirmed a correction whose volumes the QC flagged
# (apps.fetal_brain.lib.qc): a workstation that pulls the SEG from the PACS later still knows it was confirmed
QC_CONFIRMED = "QC flags confirmed"


class EmptySegmentationError(UnprocessableError):
    """A label map without any tissue: DICOM SEG cannot hold it."""


def series_description(tag: str) -> str:
    """SeriesDescription of this app's SEG objects (how a radiologist tells a result from a correction)."""
    return f"Fetal brain tissues ({TAG_DESCRIPTIONS.get(tag, tag)})"


def qc_confirmed(seg: object) -> bool:
    """Whether a SEG written by this app records that its flagged volumes were confirmed (:data:`QC_CONFIRMED`)."""
    return str(getattr(seg, "ContentDescription", "")).endswith(QC_CONFIRMED)


def template(*, tag: str, algorithm: str, creator: str = "fetal-fl", confirmed: bool = False) -> object:
    """The pydicom-seg template: one segment per FeTA tissue with name, colour and codes from the bundle."""
    import pydicom_seg

    automatic = tag == "original"
    segments = []
    for lab in foreground_labels():
        if lab.category_code is None or lab.type_code is None:
            raise ValueError(f"label {lab.name!r} has no DICOM codes in the bundle's metadata.json (label_codes)")
        segments.append(
            {
                "labelID": int(lab.value),
                "SegmentLabel": lab.display_name[:64],
                "SegmentDescription": lab.name,
                "SegmentAlgorithmType": "AUTOMATIC" if automatic else "SEMIAUTOMATIC",
                "SegmentAlgorithmName": algorithm[:64],
                "SegmentedPropertyCategoryCodeSequence": lab.category_code.as_dicom(),
                "SegmentedPropertyTypeCodeSequence": lab.type_code.as_dicom(),
                "recommendedDisplayRGBValue": [int(c) for c in lab.color],
            }
        )
    meta = {
        "ContentCreatorName": creator,
        "ContentLabel": CONTENT_LABEL,
        "ContentDescription": f"FeTA tissues, {TAG_DESCRIPTIONS.get(tag, tag)}" + (f"; {QC_CONFIRMED}" * confirmed),
        "SeriesDescription": series_description(tag),
        "SeriesNumber": "901" if automatic else "902",
        "ClinicalTrialSeriesID": "",
        "ClinicalTrialTimePointID": "",
        "ClinicalTrialCoordinatingCenterName": "",
        "BodyPartExamined": "BRAIN",
        "segmentAttributes": [segments],
    }
    return pydicom_seg.template.from_dcmqi_metainfo(meta)


def _reference_image(source_folder: Path) -> tuple[object, list[Path]]:
    """The source series as a SimpleITK image (its LPS grid) and its files in slice order."""
    import SimpleITK as sitk

    with keep_locale():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(source_folder))
        if len(ids) != 1:
            raise UnprocessableError(f"DICOM folder {source_folder.name}: expected one series, found {len(ids)}")
        files = reader.GetGDCMSeriesFileNames(str(source_folder), ids[0])
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOff()
        image = reader.Execute()
    return image, [Path(f) for f in files]


def _ras_affine(image: object) -> np.ndarray:
    lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # type: ignore[attr-defined]
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())  # type: ignore[attr-defined]
    lps[:3, 3] = image.GetOrigin()  # type: ignore[attr-defined]
    return _RAS_TO_LPS @ lps


def label_to_seg(
    label: np.ndarray,
    affine: np.ndarray,
    source_folder: str | Path,
    *,
    tag: str,
    algorithm: str,
    qc_confirmed: bool = False,
) -> object:
    """A DICOM SEG dataset for ``label`` (x, y, z array on the source series' grid, RAS ``affine``);
    ``qc_confirmed`` records that a radiologist confirmed the volumes the QC flagged."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    source_folder = Path(source_folder)
    reference, files = _reference_image(source_folder)
    label = np.asarray(label)
    if tuple(label.shape) != tuple(reference.GetSize()):  # type: ignore[attr-defined]
        raise UnprocessableError(f"label shape {label.shape} is not its series' grid {reference.GetSize()}")  # type: ignore[attr-defined]
    if not np.allclose(np.asarray(affine, dtype=float), _ras_affine(reference), atol=1e-3):
        raise UnprocessableError("label geometry differs from its DICOM series (affine mismatch)")
    if not np.any(label):
        raise EmptySegmentationError("the label map holds no tissue (all background): nothing to store as DICOM SEG")
    seg_image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(label, (2, 1, 0)), dtype=np.uint8))
    seg_image.CopyInformation(reference)
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    frame_of_reference = sources[0].get("FrameOfReferenceUID")  # read now: pydicom-seg overwrites it in place
    writer = pydicom_seg.MultiClassWriter(
        template=template(tag=tag, algorithm=algorithm, confirmed=qc_confirmed),
        inplane_cropping=False,
        skip_empty_slices=True,
        skip_missing_segment=False,
    )
    dataset = writer.write(seg_image, sources)
    dataset.ContentLabel = CONTENT_LABEL
    if frame_of_reference:  # the SEG lies in its series' frame (pydicom-seg replaces it with a new UID)
        dataset.FrameOfReferenceUID = str(frame_of_reference)
    return dataset


def seg_to_label(seg: object, source_folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a DICOM SEG onto its source series' grid: (x, y, z uint8 label map, RAS affine).

    Raises :class:`UnprocessableError` if the SEG does not reference that series or does not lie on its grid."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    dataset = seg if isinstance(seg, pydicom.Dataset) else pydicom.dcmread(str(seg))
    if str(dataset.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise UnprocessableError("not a DICOM Segmentation object")
    reference, files = _reference_image(Path(source_folder))
    series_uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    referenced = {str(item.SeriesInstanceUID) for item in dataset.get("ReferencedSeriesSequence", [])}
    if series_uid not in referenced:
        raise UnprocessableError(f"the DICOM SEG references series {sorted(referenced)}, not {series_uid}")
    result = pydicom_seg.MultiClassReader().read(dataset).image
    direction_ok = np.allclose(result.GetDirection(), reference.GetDirection(), atol=1e-4)
    spacing_ok = np.allclose(result.GetSpacing()[:2], reference.GetSpacing()[:2], atol=1e-4)
    if not (direction_ok and spacing_ok):
        raise UnprocessableError("the DICOM SEG's orientation or pixel spacing differs from its series")
    offset = np.asarray(reference.TransformPhysicalPointToContinuousIndex(result.GetOrigin()))
    if np.abs(offset - np.rint(offset)).max() > 1e-2:
        raise UnprocessableError("the DICOM SEG's frames do not lie on its series' slices")
    on_grid = sitk.Resample(result, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = np.transpose(sitk.GetArrayFromImage(on_grid), (2, 1, 0))
    return np.ascontiguousarray(array, dtype=np.uint8), _ras_affine(reference)


def write_seg_file(dataset: object, path: str | Path) -> Path:
    """Save a SEG dataset (e.g. to hand a client the file the PACS got)."""
    from fetalseg.plumbing import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.save_as(str(tmp), write_like_original=False)  # type: ignore[attr-defined]
    return path
