"""Kept corrections survive restarts and crashes mid-write, and only complete entries count."""

from __future__ import annotations

import json

import numpy as np
from FetalBrainSegLib.outbox import PENDING, REJECTED, Outbox
from FetalBrainSegLib.volumeio import nifti_bytes, read_volume

URL = "http://127.0.0.1:8000"


def test_entries_survive_a_new_outbox_object_and_hold_the_exact_bytes(tmp_path, phantom):
    payload = nifti_bytes(phantom.label, phantom.affine)
    Outbox(tmp_path).put(URL, "case 1/../x", payload, error="server down", params={"client_id": "me"})
    again = Outbox(tmp_path)  # e.g. Slicer restarted
    (entry,) = again.entries(URL)
    assert entry.image_id == "case 1/../x"
    assert entry.status == PENDING
    assert entry.params == {"client_id": "me"}
    assert again.label_bytes(entry) == payload
    assert "/" not in entry.label_file and ".." not in entry.label_file.replace(".nii.gz", "")
    vol = read_volume(tmp_path / entry.label_file)
    np.testing.assert_array_equal(vol.array, phantom.label)
    assert again.entries("http://other:1") == []


def test_a_newer_correction_of_the_same_case_replaces_the_pending_one(tmp_path):
    box = Outbox(tmp_path)
    box.put(URL, "a", b"old")
    box.put(URL, "a", b"new")
    box.put(URL, "b", b"bbb")
    entries = box.entries(URL)
    assert [e.image_id for e in entries] == ["a", "b"]
    assert box.label_bytes(entries[0]) == b"new"


def test_half_written_entries_are_ignored_and_nothing_else_is_lost(tmp_path):
    box = Outbox(tmp_path)
    kept = box.put(URL, "kept", b"data")
    # a crash after the label file but before its metadata, and a crash mid-way through a temp file
    (tmp_path / "crashed-0123.nii.gz").write_bytes(b"partial")
    (tmp_path / f".tmp-999-{kept.entry_id}.json").write_text("{")
    (tmp_path / "broken.json").write_text("{not json")
    meta_without_label = json.loads((tmp_path / f"{kept.entry_id}.json").read_text())
    meta_without_label.update(entry_id="ghost", label_file="ghost.nii.gz", image_id="ghost")
    (tmp_path / "ghost.json").write_text(json.dumps(meta_without_label))
    assert [e.image_id for e in box.entries(URL)] == ["kept"]
    assert box.label_bytes(box.entries(URL)[0]) == b"data"


def test_failures_are_counted_and_rejected_entries_are_kept_apart(tmp_path):
    box = Outbox(tmp_path)
    entry = box.put(URL, "a", b"x", error="first")
    box.record_failure(entry, "still down")
    (again,) = box.entries(URL)
    assert again.attempts == 2
    assert again.last_error == "still down"
    box.record_failure(again, "HTTP 422", rejected=True)
    assert box.entries(URL) == []
    (rejected,) = box.entries(URL, status=REJECTED)
    assert rejected.last_error == "HTTP 422"
    assert box.find(URL, "a") is not None
    box.remove(rejected)
    assert box.entries(URL, status=None) == []
    assert list(tmp_path.iterdir()) == []
