"""The module's view of the server's GA-aware volume check: shown next to the case, confirmation before a flagged
correction is used. Offline parsing tests, then the flow against the REAL server (the volumes and the published
curve are the server's; the Lib only reads and words them)."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from FetalBrainSegLib.client import parse_multipart
from FetalBrainSegLib.errors import ProtocolError, QcConfirmationRequiredError
from FetalBrainSegLib.qc import QcReport
from FetalBrainSegLib.volumeio import Volume
from FetalBrainSegLib.workflow import STORED

from fetalseg.growth import measure

REPORT = {
    "ga_weeks": 28.0,
    "ga_source": "request",
    "flagged": True,
    "flags": ["Cerebellum 12.00 ml is above the normal range for 28 weeks (published mean 5.63 ± 0.70 ml, z = +9.1)"],
    "tissues": [
        {"tissue": "cerebellum", "display_name": "Cerebellum", "volume_ml": 12.0, "status": "high",
         "expected_ml": 5.63, "sd_ml": 0.7, "z": 9.1, "low_ml": 3.53, "high_ml": 7.73,
         "source": {"short": "Ren et al. 2022"}},
        {"tissue": "ventricles", "display_name": "Ventricles", "volume_ml": 3.5, "status": "no reference"},
    ],
}  # fmt: skip


def test_report_is_worded_for_the_panel():
    report = QcReport.from_json(REPORT)
    assert report is not None and report.flagged and report.ga_weeks == 28.0
    text = report.summary_text()
    assert "28 weeks (from request)" in text and "CHECK: Cerebellum 12.00 ml is above" in text
    assert "Cerebellum: 12.00 ml (HIGH, z = +9.1, normal 3.53-7.73 ml)" in text
    assert "Ventricles: 3.50 ml (no reference)" in text
    unknown = QcReport.from_json({"ga_weeks": None, "flagged": False, "tissues": []})
    assert unknown.summary_text().startswith("Gestational age unknown")
    assert QcReport.from_json(None) is None and QcReport.from_json("x") is None  # an older server sends none


def test_multipart_answer_is_split_into_params_and_file():
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
        b'{"qc": {"flagged": false}}\r\n'
        b'--b0\r\nContent-Disposition: form-data; name="image"; filename="x.nii.gz"\r\n\r\n'
        b"\x1f\x8b\r\n\r\nbinary--b\r\n--b0--\r\n"
    )
    parts = parse_multipart('multipart/form-data; boundary="b0"', body)
    assert parts["params"] == ("", b'{"qc": {"flagged": false}}')
    assert parts["image"] == ("x.nii.gz", b"\x1f\x8b\r\n\r\nbinary--b")
    with pytest.raises(ProtocolError):
        parse_multipart("application/json", b"{}")


@pytest.mark.integration
def test_flags_shown_with_the_case_and_flagged_correction_confirmed_before_use(server, workflow):
    workflow.connect(server.url)
    case = workflow.open_case(workflow.list_cases()[-1])
    auto = workflow.segment({"ga_weeks": 28})
    assert auto.qc is not None and auto.qc.ga_weeks == 28 and auto.qc.ga_source == "request"
    assert len(auto.qc.tissues) == 10 and "28 weeks" in auto.qc.summary_text()  # 7 tissues + 3 published sums
    assert auto.label.array.shape == case.geometry.shape  # the file still comes with the report

    voxel_ml = abs(np.linalg.det(case.geometry.affine[:3, :3])) / 1000.0
    too_big = int(3 * measure("cerebellum").reference.mean_sd(28)[0] / voxel_ml) + 1  # 3x the published mean
    corrected = np.zeros(case.geometry.shape, np.uint8)
    corrected.reshape(-1)[:too_big] = 5
    assert corrected.sum() > 0 and (corrected == 5).sum() == too_big

    with pytest.raises(QcConfirmationRequiredError) as refused:
        workflow.submit(Volume(corrected, case.geometry.affine))  # the GA given at segment() is sent along
    assert refused.value.status == 409 and any("Cerebellum" in f for f in refused.value.flags)
    assert workflow.pending() == []  # not queued: nothing to re-send without the radiologist's confirmation
    objects = server.get_json("/datastore/?output=all")["objects"]
    assert "final" not in objects[case.image_id].get("labels", {})

    try:
        result = workflow.submit(Volume(corrected, case.geometry.affine), confirm_qc=True)
        assert result.status == STORED and result.qc is not None and result.qc.flagged
        objects = server.get_json("/datastore/?output=all")["objects"]
        assert objects[case.image_id]["labels"]["final"]["info"]["qc"]["confirmed"] is True
    finally:  # leave the session server's cases unlabelled for the flow tests that follow
        query = urllib.parse.urlencode({"id": case.image_id, "tag": "final"})
        request = urllib.request.Request(f"{server.url}/datastore/label?{query}", method="DELETE")
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=30).close()
    assert "final" not in server.get_json("/datastore/?output=all")["objects"][case.image_id].get("labels", {})
