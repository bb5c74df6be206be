"""A site's cases as bounded per-patient records for the DP statistics (read with the project's own loaders).

Why here: the features are what an ML engineer checks before training (case count, gestational age, voxel size,
orientation, intensities) and each is read exactly as training reads the cases (:func:`fetalseg.data.loaders.
load_dataset`, :func:`fetalseg.data.io.read_volume`), so the statistics describe the data the job will use.
Each patient contributes one record per feature (:class:`privacy.statistics.PatientRecords`); the privacy maths
lives in :mod:`privacy.statistics`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from fetalseg.data.io import read_volume
from fetalseg.data.loaders import load_dataset
from fetalseg.site_env import site_data_dir  # the one rule every site-side part uses (re-exported)
from fetalseg.site_env import site_dataset_id as dataset_id  # the ledger id the training client charges
from privacy.statistics import PatientRecords, StatisticsRequest, StatisticsRequestError, patient_histogram

log = logging.getLogger(__name__)
__all__ = ["KNOWN_FEATURES", "ORIENTATIONS", "dataset_id", "orientation_index", "patient_records", "site_data_dir"]

# Orientation is a category: the index of the image's axis codes (nibabel's aff2axcodes) in this list; the last
# bin holds every other code. The list is public (part of the code), never learned from the data.
ORIENTATIONS = ("RAS", "LAS", "LPS", "RPS", "PIR", "ASL", "LIP", "other")
# The features this module can compute, and what each means per patient.
KNOWN_FEATURES = {
    "gestational_age_weeks": "GA in weeks (participants.tsv); missing for a case without one (mark it optional)",
    "voxel_size_mm": "cube root of the voxel volume (mm)",
    "slice_thickness_mm": "largest voxel spacing (mm)",
    "orientation": f"index of the image's axis codes in {list(ORIENTATIONS)}",
    "intensity": "histogram: the patient's normalised voxel histogram inside the label (all voxels without one); "
    "scalar: the patient's mean intensity there",
}


def orientation_index(affine: np.ndarray) -> int:
    code = "".join(nib.aff2axcodes(np.asarray(affine, dtype=float)))
    return ORIENTATIONS.index(code) if code in ORIENTATIONS else len(ORIENTATIONS) - 1


def patient_records(data_dir: Path, request: StatisticsRequest, *, site: str | None = None) -> PatientRecords:
    """One bounded record per patient and feature of the request, from the site's cases (labels optional)."""
    unknown = sorted({f.name for f in request.features} - set(KNOWN_FEATURES))
    if unknown:
        raise StatisticsRequestError(f"unknown feature(s) {unknown}; this site computes {sorted(KNOWN_FEATURES)}")
    cases = load_dataset(data_dir, site=site, require_labels=False)
    n = len(cases)
    values = {f.name: np.full(n, np.nan) for f in request.features}
    distributions = {f.name: np.zeros((n, f.bins)) for f in request.features if f.kind == "distribution"}
    for i, case in enumerate(cases):
        vol = read_volume(case.image)
        spacing = np.asarray(vol.spacing[:3], dtype=float)
        for spec in request.features:
            name = spec.name
            if name == "gestational_age_weeks":
                values[name][i] = np.nan if case.ga_weeks is None else float(case.ga_weeks)
            elif name == "voxel_size_mm":
                values[name][i] = float(np.prod(spacing) ** (1.0 / 3.0))
            elif name == "slice_thickness_mm":
                values[name][i] = float(spacing.max())
            elif name == "orientation":
                values[name][i] = orientation_index(vol.affine) + 0.5  # the middle of its unit-wide bin
            elif name == "intensity":
                voxels = np.asarray(vol.array, dtype=np.float64)
                if case.label is not None:
                    mask = np.asarray(read_volume(case.label).array) > 0
                    if mask.shape == voxels.shape and mask.any():
                        voxels = voxels[mask]
                voxels = voxels[np.isfinite(voxels)]
                values[name][i] = float(voxels.mean()) if voxels.size else np.nan
                if spec.kind == "distribution":
                    distributions[name][i] = patient_histogram(voxels, spec)
    records = PatientRecords(n_patients=n, values=values, distributions=distributions)
    records.check(request)
    log.info("statistics: %d patient record(s) read from %s", n, data_dir)
    return records
