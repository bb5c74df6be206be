"""The radiologist's whole flow against the REAL MONAI Label app (apps/fetal_brain) started on 127.0.0.1.

Covers: connect, next case (active learning), auto-segmentation, an edited correction stored as ``final`` and read
back identical, fine-tuning started; a correction refused by the server (clear message, not queued); and the server
going away (mid-request and between steps): the correction is kept on disk and delivered after the restart.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import slicerio
from FetalBrainSegLib.client import MonaiLabelClient
from FetalBrainSegLib.errors import (
    ConnectionLostError,
    CorrectionInvalidError,
    NetworkError,
    NotFoundError,
    RequestRejectedError,
)
from FetalBrainSegLib.volumeio import Volume, nifti_bytes, read_volume
from FetalBrainSegLib.workflow import QUEUED, STORED, Workflow

from fetalseg.labels import foreground_labels

pytestmark = pytest.mark.integration


def _edit(label: np.ndarray, value: int) -> np.ndarray:
    """What a radiologist does in the Segment Editor: repaint a block of voxels as one tissue."""
    out = label.copy()
    out[8:14, 9:15, 10:16] = value
    assert not np.array_equal(out, label)
    return out


def _final_label_ids(server) -> set[str]:
    objects = server.get_json("/datastore/?output=all")["objects"]
    return {k for k, v in objects.items() if v.get("labels", {}).get("final")}


def test_full_flow_connect_next_case_segment_correct_submit_finetune(server, workflow):
    model = workflow.connect(server.url)
    # labels, names and colours are the server's (the bundle's), none typed in the extension
    expected = foreground_labels()
    assert [(lab.value, lab.display_name, lab.color) for lab in workflow.labels.labels] == [
        (lab.value, lab.display_name, lab.color) for lab in expected
    ]
    assert model.name == "fetal_brain_seg"
    assert model.version  # the app reports something for the served model
    summary = workflow.connection_summary()
    assert summary.startswith(f"Connected to {server.url}. Model 'fetal_brain_seg', version ")
    assert "privacy:" in summary and "origin:" in summary

    before = _final_label_ids(server)
    case = workflow.next_case()
    assert case is not None and case.strategy == workflow.strategies[0]
    assert case.image_id not in before
    image = read_volume(case.image_path)
    assert image.array.shape == (32, 32, 32)

    auto = workflow.segment()
    np.testing.assert_allclose(auto.label.affine, image.affine, atol=1e-5)
    assert auto.label.array.shape == image.array.shape
    assert set(np.unique(auto.label.array).tolist()) <= {0, *workflow.labels.values}
    seg = slicerio.read_segmentation(str(auto.seg_nrrd_path))  # what Slicer loads: tissues named and coloured
    assert [s["name"] for s in seg["segments"]] == [lab.display_name for lab in expected]
    np.testing.assert_array_equal(seg["voxels"], auto.label.array)

    corrected = _edit(auto.label.array, workflow.labels.labels[2].value)
    result = workflow.submit(Volume(corrected, image.affine))
    assert result.status == STORED, result.message
    assert result.label_id
    assert case.image_id in _final_label_ids(server) - before
    stored = workflow.fetch_stored_label()
    np.testing.assert_array_equal(stored.array, corrected)
    np.testing.assert_allclose(stored.affine, image.affine, atol=1e-5)
    assert workflow.pending() == []

    status = workflow.start_finetune({"max_epochs": 1})
    try:
        assert status.state in ("submitted", "running"), status.message
        on_server = MonaiLabelClient(server.url).training_status()
        assert on_server is not None and on_server["status"] in ("SUBMITTED", "RUNNING")
        assert workflow.training_status().state in ("submitted", "running", "done")
        # the server keeps serving while it trains: the radiologist can open the next case
        assert workflow.next_case("random") is not None
    finally:
        stopped = workflow.stop_finetune()
        # a stop that arrives while the task is still queued is applied when the server gets to it: poll
        deadline = time.monotonic() + 120
        while stopped.state in ("submitted", "running") and time.monotonic() < deadline:
            time.sleep(1)
            stopped = workflow.stop_finetune() if stopped.state == "running" else workflow.training_status()
    assert stopped.state in ("stopped", "done", "error"), stopped.message


def test_a_correction_the_server_refuses_is_explained_and_not_queued(server, workflow):
    workflow.connect(server.url)
    case = workflow.next_case("random")
    assert case is not None
    good = Volume(np.ones(case.geometry.shape, np.uint8), case.geometry.affine)

    # refused before sending: wrong grid (e.g. drawn on another volume)
    with pytest.raises(CorrectionInvalidError, match="voxels but the image has"):
        workflow.submit(Volume(good.array[:-1], good.affine))
    # refused by the server: the case no longer exists there
    workflow.case = dataclasses.replace(case, image_id="removed_case")
    with pytest.raises(NotFoundError) as err:
        workflow.submit(good)
    assert "send the correction of case 'removed_case'" in str(err.value)
    assert err.value.server_message  # the server's own words are shown
    # refused by the server's validation (its message reaches the radiologist)
    wrong_shape = nifti_bytes(np.ones((8, 8, 8), np.uint8), case.geometry.affine)
    with pytest.raises(RequestRejectedError) as rejected:
        MonaiLabelClient(server.url).save_label(case.image_id, wrong_shape)
    assert 400 <= rejected.value.status < 500
    assert rejected.value.server_message
    assert workflow.pending() == []
    assert workflow.outbox.entries(status=None) == []
    assert case.image_id not in _final_label_ids(server)


def test_entropy_strategy_picks_an_unlabelled_case(server, workflow):
    workflow.connect(server.url)
    assert "entropy" in workflow.strategies or pytest.skip("server has no entropy strategy")
    labelled = _final_label_ids(server)
    case = workflow.next_case("entropy")
    assert case is not None and case.image_id not in labelled


@pytest.mark.slow
def test_server_gone_mid_request_and_between_steps_correction_kept_then_resent(own_server, tmp_path):
    work = tmp_path / "slicer"
    wf = Workflow(work, client_id="pytest")
    wf.connect(own_server.url)
    case = wf.next_case()
    assert case is not None
    auto = wf.segment()
    corrected = _edit(auto.label.array, wf.labels.labels[0].value)

    # the server dies while it is segmenting: the radiologist is told the connection broke
    error: list[BaseException] = []

    def segment() -> None:
        try:
            wf.segment({"sw_overlap": 0.9, "roi_size": 16})  # ~1000 windows: seconds of work to interrupt
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=segment)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and thread.is_alive():
        if own_server.get_json("/info/").get("inference", {}).get("running"):
            break
        time.sleep(0.05)
    own_server.kill()
    thread.join(60)
    assert error and isinstance(error[0], ConnectionLostError), error
    assert "broke while trying to segment case" in str(error[0])

    # submitting while it is down: kept on disk, the radiologist is told so
    result = wf.submit(Volume(corrected, case.geometry.affine))
    assert result.status == QUEUED
    assert "Cannot reach the segmentation server" in result.message
    assert "saved on this computer" in result.message
    (entry,) = wf.pending()
    kept = read_volume(wf.outbox.root / entry.label_file)
    np.testing.assert_array_equal(kept.array, corrected)
    report = wf.resend_pending()
    assert report.sent == [] and report.kept == [case.image_id]
    assert isinstance(wf.client, MonaiLabelClient)

    # Slicer restarts, the server comes back on the same address: re-send delivers the correction
    own_server.start()
    again = Workflow(work, client_id="pytest")
    again.connect(own_server.url)
    assert len(again.pending()) == 1
    assert "1 correction(s) waiting" in again.connection_summary()
    report = again.resend_pending()
    assert report.sent == [case.image_id], report.message
    assert again.pending() == [] and again.outbox.entries(status=None) == []
    stored = again.fetch_stored_label(case.image_id)
    np.testing.assert_array_equal(stored.array, corrected)


def test_unreachable_server_on_connect(workflow):
    from ...conftest import free_port

    with pytest.raises(NetworkError, match="Cannot reach the segmentation server"):
        workflow.connect(f"127.0.0.1:{free_port()}")
    assert not workflow.connected
