"""Write a segmentation result as NIfTI, plain NRRD, or a Slicer ``.seg.nrrd`` with the FeTA names and colours.

``.seg.nrrd`` carries the names and colours inside the file, so Slicer shows "White matter" in its colour without
asking the server; NIfTI is the universal exchange format (and what the datastore stores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fetalseg.data.io import write_nifti
from fetalseg.labels import foreground_labels
from fetalseg.plumbing import atomic_path

NIFTI = ".nii.gz"
SEG_NRRD = ".seg.nrrd"
NRRD = ".nrrd"
RESULT_EXTENSIONS = (NIFTI, ".nii", SEG_NRRD, NRRD)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_extension(value: object) -> str:
    """Normalise a requested result extension (``nii.gz``, ``.seg.nrrd``...) or raise ValueError."""
    text = str(value).strip().lower()
    text = text if text.startswith(".") else f".{text}"
    if text not in RESULT_EXTENSIONS:
        raise ValueError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {value!r}")
    return text


def present_values(label: np.ndarray) -> list[int]:
    """Label values present in ``label`` (faster than ``np.unique`` on a 256³ volume: no sort, no int64 copy)."""
    top = int(label.max()) if label.size else -1
    return [v for v in range(top + 1) if np.any(label == v)]


def _extent(mask: np.ndarray) -> list[int]:
    """Slicer's segment extent (min/max index per axis), ``0 -1`` per axis for an empty segment."""
    extent = []
    for axis in range(3):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if not hits.size:
            return [0, -1, 0, -1, 0, -1]
        extent += [int(hits[0]), int(hits[-1])]
    return extent


def write_seg_nrrd(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``label`` (values 0..7) as a Slicer segmentation, one named, coloured segment per FeTA tissue."""
    import slicerio

    path = Path(path)
    segments = []
    for lab in foreground_labels():
        extent = _extent(label == lab.value)
        segments.append(
            {
                "id": lab.name,
                "name": lab.display_name,
                "labelValue": int(lab.value),
                "layer": 0,
                "color": [c / 255.0 for c in lab.color],
                "extent": extent,
            }
        )
    segmentation = {
        "voxels": np.ascontiguousarray(label, dtype=np.uint8),
        "ijkToLPS": _RAS_TO_LPS @ np.asarray(affine, dtype=float),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=1)
    return path


def write_nrrd(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``label`` as a plain NRRD label map (what Slicer's "Label map volume" reads)."""
    import nrrd

    path = Path(path)
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=float)
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    with atomic_path(path) as tmp:
        nrrd.write(str(tmp), np.ascontiguousarray(label, dtype=np.uint8), header, compression_level=1)
    return path


def write_result(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map in the format named by ``path``'s extension (NIfTI or ``.seg.nrrd``)."""
    path = Path(path)
    if path.name.lower().endswith(SEG_NRRD):
        return write_seg_nrrd(label, affine, path)
    if path.name.lower().endswith(NRRD):
        return write_nrrd(label, affine, path)
    return write_nifti(np.asarray(label, dtype=np.uint8), affine, path, dtype=np.uint8)
