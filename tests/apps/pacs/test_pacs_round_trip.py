"""The app against a real PACS (Orthanc + DICOMweb) over HTTP: from an empty PACS, store studies, get the next
case, infer, read the DICOM SEG back from the PACS and compare it voxel by voxel with the NIfTI result, save a
correction (stored as DICOM SEG too), fine-tune from it; bad ids and a PACS that goes down get clear 4xx."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from apps.fetal_brain.launcher import LocalServer, start
from apps.fetal_brain.lib.dicom_seg import SEG_SOP_CLASS, seg_to_label, series_description
from apps.fetal_brain.lib.dicomweb_store import PacsDatastore
from apps.fetal_brain.orthanc import Orthanc, credentials_file
from fetalseg.data.io import read_dicom_series, write_nifti
from fetalseg.labels import foreground_labels
from tests.apps.pacs.conftest import StoredCase, store_phantom

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # real Orthanc + real app server

MODEL = "fetal_brain_seg"


@dataclass
class Site:
    pacs: Orthanc
    app: LocalServer
    cases: list[StoredCase]
    cache: Path
    root: Path

    def url(self, path: str) -> str:
        return self.app.url + path


@pytest.fixture(scope="module")
def site(pacs: Orthanc, tmp_path_factory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("pacs_site")
    assert pacs.series() == []  # the round trip starts from an empty PACS
    cases = [store_phantom(pacs, root / f"dicom{i}", patient=f"P00{i}", seed=i) for i in range(2)]
    creds = credentials_file(pacs, root / "pacs.json")
    conf = [
        ("variant", "tiny"),
        ("model_path", str(root / "model" / "model.pt")),
        ("pacs_credentials", str(creds)),
        ("pacs_cache", str(root / "cache")),
        ("pacs_timeout_s", "5"),
        ("prepare_on_start", "false"),
    ]
    app = start(pacs.dicomweb_url, workdir=root / "app", conf=conf)
    yield Site(pacs, app, cases, root / "cache", root)
    app.stop()


def seg_series(pacs: Orthanc, referencing: str) -> list[pydicom.Dataset]:
    """Every DICOM SEG instance in the PACS that references series ``referencing`` (read through DICOMweb)."""
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = pacs.auth
    client = DICOMwebClient(pacs.dicomweb_url, session=session)
    out = []
    for item in client.search_for_series(search_filters={"Modality": "SEG"}):
        found = pydicom.Dataset.from_json(item)
        for ds in client.retrieve_series(str(found.StudyInstanceUID), str(found.SeriesInstanceUID)):
            refs = {str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])}
            if referencing in refs:
                out.append(ds)
    return out


def test_round_trip_infer_seg_correct_finetune(site: Site) -> None:
    uids = {c.series_uid: c for c in site.cases}
    info = requests.get(site.url("/info/"), timeout=60).json()
    assert info["datastore"]["total"] == 2

    nxt = requests.post(site.url("/activelearning/random"), json={}, timeout=60)
    assert nxt.status_code == 200, nxt.text
    uid = nxt.json()["id"]
    assert uid in uids
    case = uids[uid]

    # infer through the real server; the result is kept (tag original) and stored in the PACS as DICOM SEG
    answer = requests.post(
        site.url(f"/infer/{MODEL}?image={uid}&output=image"),
        data={"params": json.dumps({"save_label": True})},
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    nifti = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    result = np.asarray(nifti.dataobj).astype(np.uint8)
    np.testing.assert_allclose(nifti.affine, case.affine, atol=1e-3)
    segs = seg_series(site.pacs, uid)
    assert len(segs) == 1, "the model's result should be in the PACS as one DICOM SEG"
    seg = segs[0]
    assert str(seg.SOPClassUID) == SEG_SOP_CLASS and seg.SeriesDescription == series_description("original")
    source = pydicom.dcmread(str(sorted(case.folder.iterdir())[0]), stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    expected = {lab.value: lab.display_name for lab in foreground_labels()}
    assert names == {v: expected[v] for v in names} and set(names) == set(np.unique(result)) - {0}
    decoded, affine = seg_to_label(seg, case.folder)
    np.testing.assert_allclose(affine, case.affine, atol=1e-3)
    assert np.array_equal(decoded, result), "DICOM SEG and NIfTI result differ"

    # a correction (the phantom's own label) goes back to the PACS the same way
    label_file = write_nifti(case.label, case.affine, site.root / "correction.nii.gz", dtype=np.uint8)
    with open(label_file, "rb") as fh:
        saved = requests.put(
            site.url(f"/datastore/label?image={uid}&tag=final"),
            files={"label": ("correction.nii.gz", fh)},
            data={"params": "{}"},
            timeout=120,
        )
    assert saved.status_code == 200, saved.text
    finals = [s for s in seg_series(site.pacs, uid) if s.SeriesDescription == series_description("final")]
    assert len(finals) == 1
    decoded, _ = seg_to_label(finals[0], case.folder)
    assert np.array_equal(decoded, case.label)

    # fine-tune from the correction (tiny settings), through the real server
    train = requests.post(
        site.url(f"/train/{MODEL}?run_sync=true"),
        json={"max_epochs": 1, "publish": "always", "val_fraction": 0.0},
        timeout=600,
    )
    assert train.status_code == 200, train.text
    model = requests.get(site.url("/info/"), timeout=60).json()["model"]
    assert model["trained"] is True and model["origin"] == "local-finetune"
    remaining = requests.post(site.url("/activelearning/random"), json={}, timeout=60).json()
    assert remaining["id"] != uid  # the corrected case is labelled now


def test_download_and_corrections_pulled_into_a_fresh_cache(site: Site, tmp_path: Path) -> None:
    """A client (the Slicer module) downloads the image as NIfTI on the series' grid; a server with an empty cache
    finds the correction saved above in the PACS and fine-tunes on it."""
    corrected = [c for c in site.cases if seg_series(site.pacs, c.series_uid)]
    assert corrected, "run after the round trip"
    case = corrected[0]
    answer = requests.get(site.url(f"/datastore/image?image={case.series_uid}"), timeout=120)
    assert answer.status_code == 200, answer.text
    image = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    np.testing.assert_allclose(image.affine, case.affine, atol=1e-3)
    expected = read_dicom_series(case.folder).array
    np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-6)

    fresh = PacsDatastore(site.pacs.dicomweb_url, tmp_path / "cache", credentials=site.pacs.auth, timeout_s=10)
    finals = {image_id: label for image_id, _, label in fresh.final_cases()}
    assert set(finals) == {case.series_uid}
    pulled = np.asarray(nib.load(str(finals[case.series_uid])).dataobj)
    assert np.array_equal(pulled, case.label)
    assert fresh.final_cases() and fresh.pull_corrections() == []  # pulled once

    # a second correction of the same series: a new cache keeps the newest one
    newer = np.where(case.label == 5, 0, case.label).astype(np.uint8)
    path = write_nifti(newer, case.affine, tmp_path / "newer.nii.gz", dtype=np.uint8)
    with open(path, "rb") as fh:
        saved = requests.put(
            site.url(f"/datastore/label?image={case.series_uid}&tag=final"),
            files={"label": ("newer.nii.gz", fh)},
            timeout=120,
        )
    assert saved.status_code == 200, saved.text
    again = PacsDatastore(site.pacs.dicomweb_url, tmp_path / "cache2", credentials=site.pacs.auth, timeout_s=10)
    latest = {image_id: label for image_id, _, label in again.final_cases()}
    assert np.array_equal(np.asarray(nib.load(str(latest[case.series_uid])).dataobj), newer)


@pytest.mark.parametrize(
    ("image", "status"),
    [("1.2.3.4.5", 404), ("not-a-uid", 404), ("..%2Fetc", 400), ("a/b", 400)],
)
def test_unknown_or_bad_ids_are_4xx(site: Site, image: str, status: int) -> None:
    answer = requests.post(site.url(f"/infer/{MODEL}?image={image}"), timeout=60)
    assert answer.status_code == status, answer.text
    label = requests.put(
        site.url(f"/datastore/label?image={image}&tag=final"),
        files={"label": ("x.nii.gz", io.BytesIO(b"x"))},
        timeout=60,
    )
    assert label.status_code == status, label.text


def test_adding_or_deleting_pacs_data_is_refused(site: Site) -> None:
    uid = site.cases[0].series_uid
    before = len(site.pacs.series())
    assert requests.delete(site.url(f"/datastore/image?id={uid}"), timeout=60).status_code == 405
    assert requests.delete(site.url(f"/datastore/label?id={uid}&tag=final"), timeout=60).status_code == 405
    image = write_nifti(site.cases[0].label.astype(np.float32), site.cases[0].affine, site.root / "new1.nii.gz")
    with open(image, "rb") as fh:
        added = requests.put(site.url("/datastore/image?image=new1"), files={"file": ("new1.nii.gz", fh)}, timeout=60)
    assert added.status_code == 405, added.text
    assert len(site.pacs.series()) == before


@pytest.mark.parametrize("problem", ["grid", "values"])
def test_bad_labels_are_refused_before_the_pacs_sees_them(site: Site, tmp_path: Path, problem: str) -> None:
    case = site.cases[1]
    before = len(seg_series(site.pacs, case.series_uid))
    if problem == "grid":
        label, affine = case.label[:-2], case.affine
    else:
        label, affine = np.where(case.label > 0, 9, 0).astype(np.uint8), case.affine
    path = write_nifti(label, affine, tmp_path / "bad.nii.gz", dtype=np.uint8)
    with open(path, "rb") as fh:
        saved = requests.put(
            site.url(f"/datastore/label?image={case.series_uid}&tag=final"),
            files={"label": ("bad.nii.gz", fh)},
            timeout=120,
        )
    assert saved.status_code == 422, saved.text
    assert len(seg_series(site.pacs, case.series_uid)) == before


def test_pacs_down_gives_424_and_changes_nothing(site: Site, tmp_path: Path) -> None:
    """Last in the module: stops the PACS. A series not fetched yet and a label save fail with 424; what was
    fetched before still answers; the local labels are unchanged."""
    cached = site.cases[0].series_uid
    requests.post(site.url(f"/infer/{MODEL}?image={cached}&output=json"), timeout=300).raise_for_status()
    uncached = store_phantom(site.pacs, tmp_path / "late", patient="P009", seed=5).series_uid  # never fetched
    before = sorted(p.name for p in (site.cache / "labels").rglob("*") if p.is_file())
    site.pacs.stop()
    try:
        answer = requests.post(site.url(f"/infer/{MODEL}?image={uncached}&output=json"), timeout=120)
        assert answer.status_code == 424, answer.text  # it needs the PACS to fetch the series
        assert "not reachable" in answer.text
        still = requests.post(site.url(f"/infer/{MODEL}?image={cached}&output=json"), timeout=300)
        assert still.status_code == 200, still.text
        label_file = write_nifti(site.cases[0].label, site.cases[0].affine, tmp_path / "l.nii.gz", dtype=np.uint8)
        with open(label_file, "rb") as fh:
            saved = requests.put(
                site.url(f"/datastore/label?image={cached}&tag=final"),
                files={"label": ("l.nii.gz", fh)},
                timeout=120,
            )
        assert saved.status_code == 424, saved.text
        assert "not reachable" in saved.text
        assert sorted(p.name for p in (site.cache / "labels").rglob("*") if p.is_file()) == before
        assert requests.get(site.url("/info/"), timeout=60).status_code == 200
    finally:
        pass
