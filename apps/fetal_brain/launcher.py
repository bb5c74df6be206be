"""Start and stop a real server in a subprocess on a free 127.0.0.1 port (for tests, benchmarks and scripts).

Why a subprocess: it is exactly what a site runs (``python -m monailabel.main start_server`` behind this app's
front), so tests and benchmarks measure the real thing, and a crash cannot take the caller down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from apps.fetal_brain.cli import server_argv
from fetalseg.plumbing import free_port, stop_process

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def server_env(workdir: Path) -> dict[str, str]:
    """The caller's environment minus app/MONAI Label settings (so only ``conf`` configures the server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FETAL_BRAIN_", "MONAI_LABEL_"))}
    env.update(
        MONAI_LABEL_TRACKING_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"),
        FETAL_FL_APP_AUDIT_LOG=str(workdir / "audit.jsonl"),  # not the user's ~/.fetal-fl (conf audit_log wins)
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class LocalServer:
    """A running server: its URL, studies folder, log file and process."""

    url: str
    studies: Path
    log: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server and any child it started (e.g. a training run)."""
        import psutil

        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.process.pid).children(recursive=True)
        stop_process(self.process)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def start(
    studies: str | Path,
    *,
    workdir: str | Path,
    conf: Sequence[tuple[str, str]] = (),
    timeout_s: float = 120.0,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> LocalServer:
    """Start the app for ``studies`` and wait until ``GET /health`` answers; raise with the log tail if it fails.

    With ``ssl_certfile``/``ssl_keyfile`` the server speaks HTTPS (the URL says so; the readiness probe trusts
    ``ssl_certfile``, i.e. a self-signed certificate). ``env`` adds environment variables for the server.
    """
    remote = str(studies).startswith(("http://", "https://"))  # a DICOMweb URL (PACS) stays a URL
    studies, workdir = (str(studies) if remote else Path(studies)), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = server_argv(studies=studies, port=port, conf=conf, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    cmd = [sys.executable, "-m", "monailabel.main", *argv]
    log_path = workdir / "server.log"
    full_env = {**server_env(workdir), **(env or {})}
    with open(log_path, "w") as out:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    scheme = "https" if ssl_certfile else "http"
    verify: bool | str = str(ssl_certfile) if ssl_certfile else True
    server = LocalServer(f"{scheme}://127.0.0.1:{port}", studies, log_path, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{server.url}/health", timeout=5, verify=verify).status_code == 200:
                log.info("server for %s at %s", studies, server.url)
                return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not answer within {timeout_s} s:\n{server.log_tail()}")
