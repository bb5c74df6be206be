"""Kill the MONAI Label server (SIGKILL: no shutdown handlers) during a label upload and during training, restart
it on the same studies folder, and check the datastore is consistent: the index parses, every stored label is a
whole, valid label on its image's grid, every indexed label exists, the served model file (if any) loads, and the
restarted server answers and segments."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests

from apps.fetal_brain.launcher import LocalServer, start
from fetalseg.bundle import Bundle, load_checkpoint
from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import MODEL, write_studies
from tests.conftest import sphere_case

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]


def _kill(server: LocalServer) -> None:
    """SIGKILL the server and every child (a training subprocess), like a power cut for those processes."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(server.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    server.process.kill()
    server.process.wait(timeout=30)


def _label_upload(url: str, tmp: Path, image_id: str) -> requests.PreparedRequest:
    _, label, affine = sphere_case(shape=(32, 32, 32), seed=3)
    path = write_nifti(label, affine, tmp / "label.nii.gz", dtype=np.uint8)
    return requests.Request(
        "PUT",
        f"{url}/datastore/label",
        params={"image": image_id, "tag": "final"},
        files={"label": ("label.nii.gz", Path(path).read_bytes())},
        data={"params": "{}"},
    ).prepare()


def _send_raw(prepared: requests.PreparedRequest, fraction: float) -> socket.socket:
    """Send the request line, headers and ``fraction`` of the body; return the open socket."""
    parts = urlsplit(prepared.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    target = parts.path + ("?" + parts.query if parts.query else "")
    head = f"{prepared.method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items()) + "\r\n"
    body = prepared.body if isinstance(prepared.body, bytes) else str(prepared.body).encode()
    sock.sendall(head.encode() + body[: int(len(body) * fraction)])
    return sock


def _check_consistent(studies: Path, model_path: Path) -> dict:
    index = json.loads((studies / "datastore_v2.json").read_text())  # parses: not half-written
    for image_id, obj in index["objects"].items():
        for tag, label in obj["labels"].items():
            path = studies / "labels" / tag / f"{image_id}{label.get('ext', '.nii.gz')}"
            assert path.is_file(), f"index names a missing label {path}"
    for path in (studies / "labels").rglob("*.nii*"):
        data = np.asarray(nib.load(str(path)).dataobj)  # a whole file: a torn gzip raises here
        assert set(np.unique(data).tolist()) <= set(range(8)), path
        image = nib.load(str(studies / path.name))
        assert data.shape == image.shape, path
    if model_path.exists():
        net = Bundle("common", variant="tiny").network()
        load_checkpoint(net, model_path)  # the served model is a whole checkpoint
    leftovers = [p for p in (studies / "labels").rglob("*") if p.name.startswith(".")]
    assert not leftovers, f"staged files left in the label folders: {leftovers}"
    return index


def test_killed_during_label_upload_and_training_leaves_a_consistent_datastore(tmp_path):
    studies = tmp_path / "studies"
    write_studies(studies)
    model_path = tmp_path / "model" / "model.pt"
    conf = [("variant", "tiny"), ("model_path", str(model_path))]

    def restart(name: str) -> LocalServer:
        return start(studies, workdir=tmp_path / name, conf=conf, timeout_s=240)

    server = restart("run1")
    try:
        # 1. killed while the label body is half-way in: no label for case03 appears
        sock = _send_raw(_label_upload(server.url, tmp_path, "case03"), 0.5)
        time.sleep(1.0)
        _kill(server)
        sock.close()
        index = _check_consistent(studies, model_path)
        assert "final" not in index["objects"]["case03"]["labels"]

        # 2. killed right after the whole body was sent (racing the save): either saved whole or not at all
        server = restart("run2")
        sender = threading.Thread(
            target=lambda: _send_raw(_label_upload(server.url, tmp_path, "case02"), 1.0).recv(1), daemon=True
        )
        sender.start()
        time.sleep(0.3)
        _kill(server)
        _check_consistent(studies, model_path)

        # 3. killed while training runs in its subprocess
        server = restart("run3")
        response = requests.post(f"{server.url}/train/{MODEL}", json={"max_epochs": 200}, timeout=60)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = requests.get(f"{server.url}/train/", timeout=30).json()
            if str(status.get("status", "")).upper() == "RUNNING":
                break
            time.sleep(0.5)
        time.sleep(4.0)  # let the subprocess start training
        _kill(server)
        _check_consistent(studies, model_path)

        # 4. the restarted server answers and segments
        server = restart("run4")
        assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200
        infer = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "case01", "output": "json"}, timeout=300)
        assert infer.status_code == 200, infer.text[:300]
    finally:
        if server.process.poll() is None:
            server.stop()
