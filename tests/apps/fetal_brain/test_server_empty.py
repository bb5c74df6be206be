"""A server on an empty studies folder starts, says clearly that there is nothing to annotate or train on, and
leaves no uploads behind when it stops."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import requests

from apps.fetal_brain.launcher import start
from apps.fetal_brain.lib.uploads import PREFIX
from tests.apps.fetal_brain.conftest import MODEL

pytestmark = pytest.mark.integration


def test_empty_studies_folder_and_clean_shutdown(tmp_path):
    conf = [("variant", "tiny"), ("model_path", str(tmp_path / "model.pt"))]
    running = start(tmp_path / "studies", workdir=tmp_path, conf=conf)
    uploads: list[Path] = []
    try:
        url = running.url
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert info["datastore"]["total"] == 0
        assert requests.post(f"{url}/activelearning/random", json={}, timeout=30).json() == {}
        assert requests.post(f"{url}/activelearning/entropy", json={}, timeout=30).json() == {}
        train = requests.post(f"{url}/train/{MODEL}", json={"max_epochs": 1}, timeout=30)
        assert train.status_code == 422 and "no corrected cases" in train.json()["detail"]
        assert requests.get(f"{url}/train/", timeout=30).status_code == 404  # nothing was started
        upload = requests.post(f"{url}/infer/{MODEL}", files={"file": ("x.nii.gz", b"junk")}, timeout=30)
        assert upload.status_code == 422
        uploads += Path(tempfile.gettempdir()).glob(f"{PREFIX}{running.process.pid}-*")
        assert len(uploads) == 1  # the server's private upload folder exists while it runs
    finally:
        running.stop()
    assert uploads and not uploads[0].exists()
