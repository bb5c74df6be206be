"""The real server over HTTP, driven by MONAI Label's own client and plain requests: the happy paths."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import slicerio

from fetalseg.data.io import write_nifti
from fetalseg.labels import all_labels
from tests.apps.fetal_brain.conftest import (
    AFFINES,
    LABELLED,
    MODEL,
    UNLABELLED,
    snapshot,
    write_dicom_series,
    zip_folder,
)
from tests.conftest import sphere_case

pytestmark = pytest.mark.integration


def test_info_reports_labels_colours_and_model(client):
    info = client.info()
    expected = {lab.name: lab.value for lab in all_labels()}
    assert info["labels"] == expected
    assert len(info["label_info"]) == 8
    for entry, lab in zip(info["label_info"], all_labels()):
        assert (entry["value"], entry["name"], entry["display_name"]) == (lab.value, lab.name, lab.display_name)
        assert entry["color"] == list(lab.color)
    model = info["models"][MODEL]["model"]
    assert model == info["model"]
    assert model["bundle_version"] == info["bundle"]["version"] == info["version"]
    assert isinstance(model["trained"], bool)
    if not model["trained"]:
        assert model["origin"] == "untrained" and "no checkpoint" in model["note"]
    assert info["bundle"]["pixdim"] == [4.0, 4.0, 4.0]  # the tiny variant given with --conf variant tiny
    assert set(info["strategies"]) == {"random", "entropy"}
    assert info["inference"] == {"running": 0, "queued": 0}


@pytest.mark.parametrize("image_id", ["case02", "oblique", "permuted"])
def test_infer_returns_labels_on_the_input_grid(server, client, image_id):
    result_file, params = client.infer(MODEL, image_id, {})
    result = nib.load(result_file)
    source = nib.load(str(server.studies / f"{image_id}.nii.gz"))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    values = np.unique(np.asarray(result.dataobj))
    assert set(values.tolist()) <= set(range(8))
    assert params["shape"] == list(source.shape)
    assert params["label_values"] == values.tolist()
    assert set(params["latencies"]) >= {"pre", "infer", "total"}


def test_infer_seg_nrrd_has_named_coloured_segments(server, tmp_path):
    response = requests.post(
        f"{server.url}/infer/{MODEL}",
        params={"image": "oblique", "output": "image"},
        data={"params": json.dumps({"result_extension": ".seg.nrrd"})},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    path = tmp_path / "result.seg.nrrd"
    path.write_bytes(response.content)
    seg = slicerio.read_segmentation(str(path))
    by_value = {s["labelValue"]: s for s in seg["segments"]}
    for lab in all_labels()[1:]:
        assert by_value[lab.value]["name"] == lab.display_name
        np.testing.assert_allclose(by_value[lab.value]["color"], [c / 255 for c in lab.color], atol=1e-3)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ seg["ijkToLPS"]
    np.testing.assert_allclose(ras, AFFINES["LPS-anisotropic"], atol=1e-4)


def test_infer_on_an_uploaded_file_stores_nothing(server, client, tmp_path):
    image, _, affine = sphere_case(shape=(20, 24, 28), seed=3, affine=AFFINES["permuted-PIR"])
    path = write_nifti(image, affine, tmp_path / "visitor.nii.gz")
    before = snapshot(server.studies)
    with open(path, "rb") as fh:
        response = requests.post(f"{server.url}/infer/{MODEL}", files={"file": ("visitor.nii.gz", fh)}, timeout=60)
    assert response.status_code == 200, response.text
    assert b"visitor" not in response.content.split(b"\r\n\r\n", 1)[0]
    assert snapshot(server.studies) == before


def test_nrrd_image_upload_and_infer(server, tmp_path):
    import SimpleITK as sitk

    image, _, affine = sphere_case(shape=(24, 20, 22), seed=5, affine=AFFINES["LPS-anisotropic"])
    nii = write_nifti(image, affine, tmp_path / "n.nii.gz")
    nrrd = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(nrrd))
    with open(nrrd, "rb") as fh:
        up = requests.put(f"{server.url}/datastore/image", params={"image": "api_nrrd"}, files={"file": fh})
    assert up.status_code == 200, up.text
    result = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "api_nrrd", "output": "image"}, timeout=60)
    assert result.status_code == 200, result.text
    out = tmp_path / "out.nii.gz"
    out.write_bytes(result.content)
    seg = nib.load(str(out))
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)


def test_dicom_series_upload_and_infer(server, tmp_path):
    image, _, affine = sphere_case(shape=(22, 26, 18), seed=4, affine=AFFINES["LPS-anisotropic"])
    series = write_dicom_series(image * 10, affine, tmp_path / "series")
    archive = zip_folder(series, tmp_path / "series.zip")
    with open(archive, "rb") as fh:
        up = requests.put(f"{server.url}/datastore/image", params={"image": "api_dicom"}, files={"file": fh})
    assert up.status_code == 200, up.text
    assert (server.studies / "api_dicom").is_dir()
    response = requests.post(
        f"{server.url}/infer/{MODEL}", params={"image": "api_dicom", "output": "image"}, timeout=60
    )
    assert response.status_code == 200, response.text
    out = tmp_path / "dicom_seg.nii.gz"
    out.write_bytes(response.content)
    seg = nib.load(str(out))
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-3)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(8))


def test_next_sample_random_and_entropy_pick_unlabelled_cases(server, client):
    labelled = {k for k, v in client.datastore()["objects"].items() if "final" in v["labels"]}
    random_pick = client.next_sample("random", {})
    assert random_pick["id"] not in labelled
    again = [client.next_sample("random", {}) for _ in range(6)]  # within a second: stock MONAI Label gives a 500
    assert all(p["id"] not in labelled and p["weight"] >= 1 for p in again)
    response = requests.post(f"{server.url}/activelearning/entropy", json={"max_candidates": 3}, timeout=120)
    assert response.status_code == 200, response.text
    pick = response.json()
    assert pick["id"] not in labelled and pick["id"] in client.datastore()["objects"]
    assert 0.0 <= pick["entropy"] <= 1.0
    assert pick["candidates"] == 3


def _labels_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(response.content)).dataobj)


def test_every_study_is_prepared_at_start_so_an_infer_on_it_is_warm(server):
    warm_up = server.info()["prepared_inputs"]["warm_up"]
    n_studies = len(LABELLED) + len(UNLABELLED) + 1  # + the big volume
    assert warm_up == {"state": "done", "prepared": n_studies, "failed": 0, "studies": n_studies}
    before = server.info()["prepared_inputs"]
    infer = {"image": LABELLED[1], "output": "image"}
    _labels_of(requests.post(f"{server.url}/infer/{MODEL}", params=infer, timeout=120))
    after = server.info()["prepared_inputs"]
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 1


def test_next_case_is_prepared_ahead_and_infers_as_a_cold_request_does(server):
    before = server.info()["prepared_inputs"]
    response = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60)
    assert response.status_code == 200, response.text
    image_id = response.json()["id"]
    source = Path(response.json()["path"])  # the datastore's file (a folder for a DICOM series)
    assert source.is_relative_to(server.studies)
    deadline = time.monotonic() + 60
    stats = server.info()["prepared_inputs"]
    while stats["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = server.info()["prepared_inputs"]
    assert stats["enabled"] and stats["pending"] == 0
    infer = {"image": image_id, "output": "image"}
    prepared = _labels_of(requests.post(f"{server.url}/infer/{MODEL}", params=infer, timeout=120))
    after = server.info()["prepared_inputs"]
    assert after["hits"] == stats["hits"] + 1 and after["misses"] == before["misses"]  # used the prepared input
    assert after["bytes"] <= after["max_bytes"] and after["entries"] >= 1
    now = time.time_ns()
    os.utime(source, ns=(now, now))  # a new file version: nothing prepared, the /infer reads it afresh
    cold = _labels_of(requests.post(f"{server.url}/infer/{MODEL}", params=infer, timeout=120))
    assert server.info()["prepared_inputs"]["misses"] == after["misses"] + 1
    np.testing.assert_array_equal(prepared, cold)


def test_downloading_an_image_prepares_it_for_the_infer_that_follows(server):
    now = time.time_ns()
    os.utime(server.studies / "case03.nii.gz", ns=(now, now))  # a file version nothing has prepared yet
    before = server.info()["prepared_inputs"]
    download = requests.get(f"{server.url}/datastore/image", params={"image": "case03"}, timeout=60)
    assert download.status_code == 200, download.text
    deadline = time.monotonic() + 60
    while server.info()["prepared_inputs"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = server.info()["prepared_inputs"]
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "case03", "output": "image"}, timeout=120)
    _labels_of(response)
    after = server.info()["prepared_inputs"]
    assert stats["prefetched"] == before["prefetched"] + 1  # the download started it
    assert after["misses"] == before["misses"] and after["hits"] == stats["hits"] + 1


def test_save_label_stores_the_correction(server, client, tmp_path):
    source = nib.load(str(server.studies / "case03.nii.gz"))
    label = np.zeros(source.shape, np.uint8)
    label[8:24, 8:24, 8:24] = 3
    label[12:20, 12:20, 12:20] = 4
    path = write_nifti(label, source.affine, tmp_path / "case03_fix.nii.gz", dtype=np.uint8)
    completed = client.info()["datastore"]["completed"]
    result = client.save_label("case03", str(path), tag="final")
    assert result["image"] == "case03"
    stored = nib.load(str(server.studies / "labels" / "final" / "case03.nii.gz"))
    np.testing.assert_array_equal(np.asarray(stored.dataobj), label)
    np.testing.assert_allclose(stored.affine, source.affine, atol=1e-6)
    assert client.info()["datastore"]["completed"] == completed + 1


def test_save_slicer_segmentation_maps_segment_names_to_feta_values(server, tmp_path):
    source = nib.load(str(server.studies / "permuted.nii.gz"))
    mask = np.zeros(source.shape, bool)
    mask[5:15, 5:15, 4:12] = True
    seg = slicerio.create_segmentation(source.shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ source.affine)
    slicerio.add_segment(seg, mask, {"id": "wm", "name": "White matter"})  # stored as value 1 by Slicer
    path = tmp_path / "edit.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    with open(path, "rb") as fh:
        response = requests.put(
            f"{server.url}/datastore/label", params={"image": "permuted"}, files={"label": ("edit.seg.nrrd", fh)}
        )
    assert response.status_code == 200, response.text
    stored = np.asarray(nib.load(str(server.studies / "labels" / "final" / "permuted.nii.gz")).dataobj)
    assert set(np.unique(stored[mask]).tolist()) == {3}  # white matter is 3 in FeTA, whatever Slicer stored
    assert not stored[~mask].any()
