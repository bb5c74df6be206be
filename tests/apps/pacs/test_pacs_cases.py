"""Which PACS series are cases, and ``fetal-fl app export-cases`` from the PACS, against a real Orthanc.

A study holds a T2w series and a DWI series: only the T2w one is a case; a study with only a localiser is not a
case and asking for it says so. Corrections stored in the PACS as DICOM SEG (as another workstation would) are
exported by the real CLI with the QC rule kept: a correction whose volumes the published growth curve flags is
exported only if the SEG records the radiologist's confirmation.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.dicom_seg import label_to_seg, write_seg_file
from apps.fetal_brain.lib.dicomweb_store import PacsDatastore, open_pacs_datastore
from apps.fetal_brain.lib.errors import NotFoundError, UnprocessableError
from apps.fetal_brain.orthanc import Orthanc
from fetal_fl.cli import main
from fetalseg.data.dicom_series import write_dicom_series
from fetalseg.data.io import read_dicom_series
from fetalseg.data.phantom import generate_phantom, site_profiles
from fetalseg.qc import label_with_volumes, typical_volumes_ml

pytestmark = [pytest.mark.integration]  # real Orthanc (skipped with the reason where it is not installed)

GA = 28.0


def _series(pacs: Orthanc, folder: Path, *, patient: str, study: str, description: str, seed: int) -> tuple:
    """A 32³ phantom stored as one MR series of ``study`` whose DICOM tags give GA 28 weeks (Last Menstrual Date);
    returns (SeriesInstanceUID, folder, RAS affine)."""
    case = generate_phantom(shape=(32, 32, 32), ga_weeks=GA, profile=site_profiles(1)[0], seed=seed)
    files = write_dicom_series(
        case.image, case.affine, folder, patient_id=patient, study_uid=study, series_description=description
    )
    for path in files:
        ds = pydicom.dcmread(str(path))
        scan = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date()
        ds.LastMenstrualDate = (scan - dt.timedelta(weeks=GA)).strftime("%Y%m%d")
        ds.save_as(str(path))
    assert all(a["Status"] == "Success" for a in pacs.store(files))
    uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    return uid, folder, read_dicom_series(folder).affine


def _correction(pacs: Orthanc, folder: Path, affine: np.ndarray, *, flagged: bool, confirmed: bool) -> np.ndarray:
    """A correction with chosen volumes stored in the PACS as this app's DICOM SEG (another workstation's save)."""
    volumes = typical_volumes_ml(GA)
    if flagged:
        volumes["cerebellum"] *= 3  # far above the published range at 28 weeks
    label = label_with_volumes(volumes, (32, 32, 32), affine)
    seg = label_to_seg(label, affine, folder, tag="final", algorithm="other workstation", qc_confirmed=confirmed)
    pacs.store([write_seg_file(seg, folder.parent / f"{folder.name}_seg.dcm")])
    return label


@pytest.fixture(scope="module")
def studies(pacs: Orthanc, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pacs_cases")
    uid = pydicom.uid.generate_uid
    s1, s2, s3, s4 = uid(), uid(), uid(), uid()
    t2, f1, a1 = _series(pacs, root / "t2", patient="P1", study=s1, description="T2w fetal brain (synthetic)", seed=1)
    dwi, _, _ = _series(pacs, root / "dwi", patient="P1", study=s1, description="DWI b1000", seed=2)
    flagged, f2, a2 = _series(pacs, root / "t2b", patient="P2", study=s2, description="SVR T2 recon", seed=3)
    confirmed, f3, a3 = _series(pacs, root / "t2c", patient="P3", study=s3, description="HASTE cor", seed=4)
    scout, _, _ = _series(pacs, root / "loc", patient="P4", study=s4, description="Localizer", seed=5)
    labels = {
        t2: _correction(pacs, f1, a1, flagged=False, confirmed=False),
        flagged: _correction(pacs, f2, a2, flagged=True, confirmed=False),
        confirmed: _correction(pacs, f3, a3, flagged=True, confirmed=True),
    }
    return {
        "root": root,
        "t2": t2,
        "dwi": dwi,
        "flagged": flagged,
        "confirmed": confirmed,
        "scout": scout,
        "s1": s1,
        "s4": s4,
        "labels": labels,
    }


def test_only_t2w_series_are_cases_and_others_get_clear_errors(pacs: Orthanc, studies: dict, tmp_path, monkeypatch):
    store = PacsDatastore(pacs.dicomweb_url, tmp_path / "cache", credentials=pacs.auth, timeout_s=10)
    assert sorted(store.list_images()) == sorted([studies["t2"], studies["flagged"], studies["confirmed"]])
    assert store.check_image(studies["t2"]) == studies["t2"]
    with pytest.raises(UnprocessableError, match=r"'DWI b1000'.*not a T2-weighted.*use its T2w series") as exc:
        store.check_image(studies["dwi"])
    assert studies["t2"] in str(exc.value) and exc.value.status == 422
    with pytest.raises(UnprocessableError, match=r"no T2-weighted reconstructed series.*'Localizer'"):
        store.check_image(studies["s4"])  # a study without the needed series
    with pytest.raises(UnprocessableError, match="the study has no usable series"):
        store.check_image(studies["scout"])
    with pytest.raises(UnprocessableError, match=f"is a study; image ids are its T2w series: \\['{studies['t2']}'\\]"):
        store.check_image(studies["s1"])
    with pytest.raises(NotFoundError):
        store.check_image("1.2.3.4.5")
    assert not (tmp_path / "cache" / studies["dwi"]).exists()  # nothing fetched for a refused id
    other = PacsDatastore(
        pacs.dicomweb_url, tmp_path / "cache2", credentials=pacs.auth, timeout_s=10, series_pattern="(?i)dwi"
    )
    assert other.list_images() == [studies["dwi"]]  # the pattern is a setting ...
    conf = AppConfig.from_conf({"pacs_series": "(?i)localizer", "pacs_cache": str(tmp_path / "cache3")}, env={})
    monkeypatch.setenv("FETAL_BRAIN_PACS_USER", pacs.user)
    monkeypatch.setenv("FETAL_BRAIN_PACS_PASSWORD", pacs.password)
    assert open_pacs_datastore(pacs.dicomweb_url, conf).list_images() == [studies["scout"]]  # ... --conf pacs_series
    with pytest.raises(ValueError, match="pacs_series"):
        AppConfig.from_conf({"pacs_series": "(unclosed"}, env={})


def test_export_cases_from_the_pacs_keeps_the_qc_rule(pacs: Orthanc, studies: dict, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "export", tmp_path / "cache"
    argv = ["app", "export-cases", "--studies", pacs.dicomweb_url, "--out", str(out), "--site", "site-1"]
    argv += ["--conf", "pacs_cache", str(cache), "--conf", "pacs_timeout_s", "10"]

    monkeypatch.delenv("FETAL_BRAIN_PACS_USER", raising=False)
    monkeypatch.delenv("FETAL_BRAIN_PACS_PASSWORD", raising=False)
    assert main(argv) == 2  # no credentials: Orthanc refuses, the command says so and writes nothing
    assert "refused our credentials" in capsys.readouterr().err and not out.exists()

    monkeypatch.setenv("FETAL_BRAIN_PACS_USER", pacs.user)
    monkeypatch.setenv("FETAL_BRAIN_PACS_PASSWORD", pacs.password)  # the environment, never the command line
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exported"] == 2 and result["skipped"] == []
    exported = {p.name.removesuffix(".nii.gz") for p in (out / "labels").iterdir()}
    assert exported == {studies["t2"], studies["confirmed"]}  # the unconfirmed flagged correction is not used
    (not_used,) = result["not_used_from_pacs"]
    assert "confirm_qc" in not_used["problem"] and "Cerebellum" in not_used["problem"]
    for uid in exported:
        label = np.asarray(nib.load(str(out / "labels" / f"{uid}.nii.gz")).dataobj)
        assert np.array_equal(label, studies["labels"][uid])
        image = nib.load(str(out / "images" / f"{uid}.nii.gz"))
        assert image.shape == label.shape
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["site"] == "site-1" and len(manifest["cases"]) == 2
