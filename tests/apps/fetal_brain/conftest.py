"""Fixtures for the MONAI Label app tests: a synthetic studies folder and one real server per test session.

The server is the real thing: ``python -m monailabel.main start_server`` in a subprocess, behind the app's ASGI
front, on a free 127.0.0.1 port, with the bundle's ``tiny`` variant (32³ volumes at 4 mm) so every request is
fast. Tests that change the server's state use their own image ids.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from apps.fetal_brain.launcher import LocalServer, start
from fetalseg.data.io import write_nifti
from tests.conftest import sphere_case, write_dicom_series  # noqa: F401  (used by the app tests)

MODEL = "fetal_brain_seg"
MAX_UPLOAD_MB = 4
AFFINES = {
    "RAS": np.diag([2.0, 2.0, 2.0, 1.0]),
    "LPS-anisotropic": np.array([[-1.7, 0, 0, 30], [0, -2.3, 0, 20], [0, 0, 3.1, -10], [0, 0, 0, 1]]),
    "permuted-PIR": np.array([[0, 0, 2.5, 0], [-2.2, 0, 0, 0], [0, -1.9, 0, 0], [0, 0, 0, 1]]),
}
LABELLED = ("case00", "case01")
UNLABELLED = ("case02", "case03", "oblique", "permuted")
BIG = "big"  # 128³ at 1 mm: an inference long enough to watch from another request


def write_studies(folder: Path) -> None:
    """Images (two with final labels), one oblique and one permuted-axes case, and a bigger volume."""
    for i, name in enumerate(LABELLED + UNLABELLED[:2]):
        image, label, affine = sphere_case(shape=(32, 32, 32), seed=i)
        write_nifti(image, affine, folder / f"{name}.nii.gz")
        if name in LABELLED:
            write_nifti(label, affine, folder / "labels" / "final" / f"{name}.nii.gz", dtype=np.uint8)
    for name, key in (("oblique", "LPS-anisotropic"), ("permuted", "permuted-PIR")):
        image, _, affine = sphere_case(shape=(21, 26, 17), seed=7, affine=AFFINES[key])
        write_nifti(image, affine, folder / f"{name}.nii.gz")
    rng = np.random.default_rng(0)
    write_nifti(rng.normal(size=(128, 128, 128)).astype(np.float32), np.eye(4), folder / f"{BIG}.nii.gz")


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"series/{path.name}")
    return archive


def snapshot(studies: Path) -> dict:
    """Every stored file (hash) and every datastore entry with its label tags: equal before/after = unchanged."""
    files = {}
    for path in sorted(studies.rglob("*")):
        rel = path.relative_to(studies)
        if path.is_file() and rel.parts[0] != ".staging" and path.name not in {"datastore_v2.json", ".lock"}:
            files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    return {"files": files, "objects": {k: sorted(v["labels"]) for k, v in objects.items()}}


@dataclass
class Server:
    """A running test server and where its files are."""

    url: str
    studies: Path
    model_path: Path
    root: Path
    running: LocalServer

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def info(self) -> dict:
        response = self.get("/info/")
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """One real MONAI Label server (this app, tiny bundle) for the whole test session."""
    root = tmp_path_factory.mktemp("fetal_brain_server")
    studies = root / "studies"
    write_studies(studies)
    model_path = root / "model" / "model.pt"
    conf = [
        ("variant", "tiny"),
        ("model_path", str(model_path)),
        ("max_upload_mb", str(MAX_UPLOAD_MB)),
        ("entropy_candidates", "4"),
    ]
    running = start(studies, workdir=root, conf=conf)
    server = Server(running.url, studies, model_path, root, running)
    wait_for_warm_up(server)
    yield server
    running.stop()


def wait_for_warm_up(server: Server, timeout_s: float = 120) -> dict:
    """Block until the server has prepared its studies (``prepare_on_start``), so tests that count cache hits
    and misses see only their own requests; return the warm-up's final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = server.info()["prepared_inputs"]["warm_up"]
        if state["state"] not in ("not started", "running") or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


@pytest.fixture(scope="session")
def client(server, tmp_path_factory):
    """MONAI Label's own Python client, pointed at the test server."""
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))
