"""Gestational-age-aware QC through the real server over HTTP: flags in /infer, confirmation of flagged corrections.

Corrections are label maps with chosen tissue volumes placed inside or outside the published range (fetalseg.growth,
Ren et al. 2022 weekly mean ± SD); the test server's volumes are 32³ at 2 mm, 0.008 ml per voxel (262 ml).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from fetalseg.data.io import read_volume, write_nifti
from fetalseg.growth import measure
from fetalseg.qc import label_with_volumes, tissue_volumes_ml, typical_volumes_ml
from tests.apps.fetal_brain.conftest import MODEL, snapshot
from tests.conftest import sphere_case

pytestmark = pytest.mark.integration

VOXEL_ML = 0.008
GA = 28.0


def _label_file(folder: Path, volumes_ml: dict, affine: np.ndarray, name: str) -> Path:
    path = folder / f"{name}.nii.gz"
    write_nifti(label_with_volumes(volumes_ml, (32, 32, 32), affine), affine, path, dtype=np.uint8)
    return path


@pytest.fixture(scope="module")
def qc_image(server, tmp_path_factory) -> tuple[str, np.ndarray]:
    """A fresh datastore image of our own (no labels) and its affine."""
    folder = tmp_path_factory.mktemp("qc")
    image, _, affine = sphere_case(shape=(32, 32, 32), seed=11)
    write_nifti(image, affine, folder / "qc_case.nii.gz")
    with open(folder / "qc_case.nii.gz", "rb") as fh:
        up = requests.put(f"{server.url}/datastore/image", params={"image": "qc_case"}, files={"file": fh}, timeout=60)
    assert up.status_code == 200, up.text
    return "qc_case", affine


def _infer(server, image: str, params: dict, output: str = "json") -> requests.Response:
    return requests.post(
        f"{server.url}/infer/{MODEL}",
        params={"image": image, "output": output},
        data={"params": json.dumps(params)},
        timeout=120,
    )


def _put_label(server, image: str, path: Path, params: dict) -> requests.Response:
    with open(path, "rb") as fh:
        return requests.put(
            f"{server.url}/datastore/label",
            params={"image": image, "tag": "final"},
            data={"params": json.dumps(params)},
            files={"label": (path.name, fh)},
            timeout=60,
        )


def test_infer_reports_volumes_and_the_check_at_the_requested_ga(server, client):
    result_file, params = client.infer(MODEL, "case02", {"ga_weeks": GA})
    qc = params["qc"]
    assert qc["ga_weeks"] == GA and qc["ga_source"] == "request" and qc["status"] == "checked"
    returned = read_volume(result_file)
    expected = tissue_volumes_ml(returned.array.astype(int), returned.affine)
    assert qc["volumes_ml"] == pytest.approx(expected, abs=1e-3)  # the volumes of what the server returned
    cerebellum = next(t for t in qc["tissues"] if t["tissue"] == "cerebellum")
    assert (cerebellum["expected_ml"], cerebellum["sd_ml"]) == measure("cerebellum").reference.mean_sd(GA)
    assert cerebellum["status"] in ("ok", "low", "high")
    assert qc["flagged"] == (cerebellum["status"] != "ok") == bool(qc["flags"])
    assert "Ren" in cerebellum["source"]["citation"] and cerebellum["source"]["measure"] == "CBV"
    no_reference = {t["tissue"] for t in qc["tissues"] if t["status"] == "no reference"}
    assert no_reference == {"white_matter", "deep_grey_matter"}


def test_infer_without_ga_says_so_and_flags_nothing(server):
    response = _infer(server, "case03", {})
    assert response.status_code == 200, response.text
    qc = response.json()["qc"]
    assert qc["status"] == "no GA" and qc["flagged"] is False and qc["flags"] == []
    assert "gestational age unknown" in qc["message"] and len(qc["volumes_ml"]) == 7


@pytest.mark.parametrize("bad", ["abc", 60, 3, "NaN", True])
def test_absurd_ga_is_a_quick_4xx_and_stores_nothing(server, bad):
    before = snapshot(server.studies)
    started = time.monotonic()
    response = _infer(server, "case02", {"ga_weeks": bad, "save_label": True})
    assert response.status_code == 400, response.text
    assert time.monotonic() - started < 5  # refused before the model runs
    detail = response.json()["detail"]
    assert detail.startswith("ga_weeks") and "weeks" in detail
    assert snapshot(server.studies) == before


def test_ga_from_participants_tsv(server):
    tsv = server.studies / "participants.tsv"
    try:
        tsv.write_text("participant_id\tGestational age\ncase01\t30.5\ncase00\t99\n")
        qc = _infer(server, "case01", {}).json()["qc"]
        assert (qc["ga_weeks"], qc["ga_source"]) == (30.5, "participants.tsv")
        assert _infer(server, "case01", {"ga_weeks": 25}).json()["qc"]["ga_weeks"] == 25  # the request wins
        bad = _infer(server, "case00", {})
        assert bad.status_code == 422 and "99" in bad.json()["detail"]
    finally:
        tsv.unlink(missing_ok=True)


def test_correction_inside_the_published_range_is_stored_with_its_check(server, qc_image, tmp_path):
    image, affine = qc_image
    volumes = typical_volumes_ml(GA)  # every tissue at the published weekly mean
    response = _put_label(server, image, _label_file(tmp_path, volumes, affine, "normal"), {"ga_weeks": GA})
    assert response.status_code == 200, response.text
    qc = response.json()["qc"]
    assert qc["flagged"] is False and qc["confirmed"] is False, qc["flags"]
    assert qc["volumes_ml"]["cerebellum"] == pytest.approx(volumes["cerebellum"], abs=VOXEL_ML)


def test_flagged_correction_needs_confirmation_before_it_is_used(server, qc_image, tmp_path):
    image, affine = qc_image
    volumes = typical_volumes_ml(GA)
    volumes["cerebellum"] *= 3  # 3x the published mean: z ≈ +16
    path = _label_file(tmp_path, volumes, affine, "big_cerebellum")
    before = snapshot(server.studies)
    refused = _put_label(server, image, path, {"ga_weeks": GA})
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert any(p.startswith("Cerebellum") and "above the normal range" in p for p in body["problems"])
    assert "confirm_qc" in body["detail"]
    assert snapshot(server.studies) == before  # nothing stored: not used for fine-tuning, not exported

    bad_flag = _put_label(server, image, path, {"ga_weeks": GA, "confirm_qc": "maybe"})
    assert bad_flag.status_code == 400 and snapshot(server.studies) == before

    confirmed = _put_label(server, image, path, {"ga_weeks": GA, "confirm_qc": True})
    assert confirmed.status_code == 200, confirmed.text
    qc = confirmed.json()["qc"]
    assert qc["flagged"] is True and qc["confirmed"] is True
    stored = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    info = stored["objects"][image]["labels"]["final"]["info"]
    assert info["qc"]["confirmed"] is True and info["confirm_qc"] is True  # the confirmation is kept with it
    audit = [json.loads(line) for line in (server.root / "audit.jsonl").read_text().splitlines()]
    saved = [e for e in audit if e["event"] == "label_saved" and e["image"] == image]
    assert saved[-1]["qc"]["confirmed"] is True and saved[-1]["qc"]["flags"]  # who confirmed what, on record


def test_small_correction_without_ga_is_stored_unflagged(server, qc_image, tmp_path):
    image, affine = qc_image
    response = _put_label(server, image, _label_file(tmp_path, {"cerebellum": 0.008}, affine, "tiny"), {})
    assert response.status_code == 200, response.text
    assert response.json()["qc"]["status"] == "no GA" and response.json()["qc"]["flagged"] is False
