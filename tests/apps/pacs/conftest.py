"""Fixtures for the PACS round trip: a private Orthanc (with its DICOMweb plugin) started from its binary, and
synthetic cases stored in it as DICOM MR series. Skipped, saying which Debian package is missing, where Orthanc
is not installed (``.ci/run`` installs it)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from apps.fetal_brain import orthanc
from fetalseg.data.dicom_series import write_dicom_series
from fetalseg.data.io import read_dicom_series
from fetalseg.data.phantom import generate_phantom, site_profiles


@dataclass
class StoredCase:
    """A phantom stored in the PACS: its series UID, the local copy of its files, label and grid."""

    series_uid: str
    folder: Path
    label: np.ndarray
    affine: np.ndarray


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[orthanc.Orthanc]:
    """An empty Orthanc on a free 127.0.0.1 port, auth on; stopped (and its storage removed) after the module."""
    reason = orthanc.missing()
    if reason:
        pytest.skip(f"skipped: Orthanc PACS tests need {reason}")
    server = orthanc.start(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def store_phantom(pacs: orthanc.Orthanc, folder: Path, *, patient: str, seed: int, shape=(32, 32, 32)) -> StoredCase:
    """A 32³ phantom at 4 mm (the bundle's tiny variant) as an MR series, stored through Orthanc's REST API."""
    case = generate_phantom(shape=shape, ga_weeks=27.0 + seed, profile=site_profiles(1)[0], seed=seed)
    files = write_dicom_series(case.image, case.affine, folder, patient_id=patient)
    answers = pacs.store(files)
    assert all(a["Status"] == "Success" for a in answers)
    series = read_dicom_series(folder)
    import pydicom

    uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    return StoredCase(uid, folder, case.label, series.affine)
