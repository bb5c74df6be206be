"""Fixtures for the Slicer extension's tests: the Lib on ``sys.path`` as Slicer puts it, FeTA-like data, and a real
MONAI Label server (``apps/fetal_brain``) started in a subprocess on a free 127.0.0.1 port.

Test data come from the core package (``fetalseg``: phantoms and the bundle's labels); the extension itself never
imports it. The server is started exactly as a site would (``python -m monailabel.main start_server`` behind the
app's own ``--uvicorn_app apps.fetal_brain.server:app`` front) with the app's settings for tiny volumes
(``--conf pixdim 4 --conf patch_size 32``) and a served-model path in the test's temporary folder (fine-tuning
publishes there, never into the repository's bundle).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fetalseg.plumbing import free_port  # also imported from here by the client tests

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "slicer_extension" / "FetalBrainSeg"
APP_DIR = REPO_ROOT / "apps" / "fetal_brain"
if str(MODULE_DIR) not in sys.path:  # what Slicer does for a scripted module: its folder is on sys.path
    sys.path.insert(0, str(MODULE_DIR))

SHAPE = (32, 32, 32)
N_CASES = 3
SERVER_START_TIMEOUT_S = 240.0


# ---------------------------------------------------------------------------------------------------------------
# Labels and volumes
# ---------------------------------------------------------------------------------------------------------------


def bundle_info() -> dict[str, Any]:
    """An ``/info/``-shaped dict whose labels come from the bundle (as the app reports them), for offline tests."""
    from fetalseg.labels import all_labels

    labels = all_labels()
    return {
        "name": "fetal_brain",
        "labels": {lab.name: lab.value for lab in labels},
        "models": {
            "fetal_brain_seg": {
                "type": "segmentation",
                "labels": {lab.name: lab.value for lab in labels},
                "label_colors": {lab.name: list(lab.color) for lab in labels},
                "label_display_names": {lab.name: lab.display_name for lab in labels},
            }
        },
    }


@pytest.fixture
def info() -> dict[str, Any]:
    return bundle_info()


@pytest.fixture
def labelset(info: dict[str, Any]):
    from FetalBrainSegLib.labels import LabelSet

    return LabelSet.from_info(info, "fetal_brain_seg")


@dataclass
class PhantomCase:
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def make_phantom(seed: int = 0, site: int = 0) -> PhantomCase:
    """A 32³ synthetic fetal brain with FeTA labels, in a site's own orientation (not always RAS)."""
    from fetalseg.data.phantom import generate_phantom, site_profiles

    profile = site_profiles(3)[site]
    p = generate_phantom(shape=SHAPE, ga_weeks=26.0 + seed, profile=profile, seed=seed)
    return PhantomCase(p.image, p.label, p.affine)


@pytest.fixture(scope="session")
def phantom() -> PhantomCase:
    return make_phantom(seed=0, site=1)  # LPS-oriented, anisotropic-blur site: geometry is not trivial


def write_studies(folder: Path, n: int = N_CASES) -> list[str]:
    """A MONAI Label studies folder of ``n`` phantom images (no labels yet); returns the image ids."""
    from fetalseg.data.io import write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        case = make_phantom(seed=i, site=i % 3)
        image_id = f"case{i:03d}_T2w"
        write_nifti(case.image, case.affine, folder / f"{image_id}.nii.gz", dtype=np.float32)
        ids.append(image_id)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# The real MONAI Label server
# ---------------------------------------------------------------------------------------------------------------


def app_missing_reason() -> str | None:
    if not (APP_DIR / "main.py").is_file():
        return f"the MONAI Label app is not written yet ({APP_DIR / 'main.py'} missing; issue 8)"
    return None


@dataclass
class ServerProcess:
    """A running ``monailabel start_server`` subprocess."""

    url: str
    port: int
    studies: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> ServerProcess:
        env = dict(os.environ)
        env.update(
            MONAI_LABEL_TRACKING_ENABLED="false",
            MLFLOW_DISABLE_TELEMETRY="true",
            MONAI_LABEL_SESSION_PATH=str(self.studies.parent / "sessions"),
            PYTHONUNBUFFERED="1",
        )
        cmd = [
            sys.executable, "-m", "monailabel.main", "start_server",
            "--app", str(APP_DIR),
            "--studies", str(self.studies),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--uvicorn_app", "apps.fetal_brain.server:app",  # the app's hardened front (as its README starts it)
            "--conf", "pixdim", "4",
            "--conf", "patch_size", "32",
            "--conf", "device", "cpu",
            "--conf", "model_path", str(self.studies.parent / "model" / "model.pt"),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.process = subprocess.Popen(
            cmd, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited with {self.process.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/info/", timeout=5) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"MONAI Label server did not answer /info/ within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server and everything it started (training subprocesses too)."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def kill(self) -> None:
        """The server goes away without warning (power cut, crash)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())


def _new_server(root: Path) -> ServerProcess:
    studies = root / "studies"
    write_studies(studies)
    port = free_port()
    return ServerProcess(f"http://127.0.0.1:{port}", port, studies, root / "server.log")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the session's flow tests (tests must leave its datastore usable for the next one)."""
    reason = app_missing_reason()
    if reason:
        pytest.skip(reason)
    srv = _new_server(tmp_path_factory.mktemp("monailabel"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server this test may stop, kill and restart (same port, same studies folder)."""
    reason = app_missing_reason()
    if reason:
        pytest.skip(reason)
    srv = _new_server(tmp_path)
    srv.start()
    yield srv
    srv.stop()
    if os.environ.get("KEEP_SERVER_LOGS") is None:
        shutil.rmtree(tmp_path / "sessions", ignore_errors=True)


@pytest.fixture
def workflow(tmp_path: Path):
    from FetalBrainSegLib.workflow import Workflow

    return Workflow(tmp_path / "work", client_id="pytest")
