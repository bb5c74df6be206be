"""Start a private Orthanc PACS (with its DICOMweb plugin) from its binary, for tests, the demo and benchmarks.

Why not the system service: a test needs an empty PACS it owns, on a free port, with its storage in a temporary
folder, authentication on and the DICOM port off, and nothing left behind. Orthanc has no bind-address option:
``RemoteAccessAllowed: false`` makes it refuse every client that is not this machine, and HTTP basic auth guards
the rest. Instances are stored through Orthanc's own REST API (``POST /instances``).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fetalseg.plumbing import atomic_write_json, free_port, stop_process

PACKAGES = {"orthanc": "Orthanc", "orthanc-dicomweb": "libOrthancDicomWeb.so"}
_BINARY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


def orthanc_binary() -> Path | None:
    """The Orthanc executable (Debian package ``orthanc``), or None."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    for folder in _BINARY_DIRS:
        if (Path(folder) / "Orthanc").is_file():
            return Path(folder) / "Orthanc"
    return None


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library (Debian package ``orthanc-dicomweb``), or None."""
    for folder in _PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return path
    return None


def missing() -> str | None:
    """Why Orthanc cannot be started here (naming the Debian package to install), or None if it can."""
    lacking = []
    if orthanc_binary() is None:
        lacking.append("orthanc")
    if dicomweb_plugin() is None:
        lacking.append("orthanc-dicomweb")
    if not lacking:
        return None
    return f"Debian package(s) {', '.join(lacking)} not installed (apt-get install -y orthanc orthanc-dicomweb)"


@dataclass
class Orthanc:
    """A running private Orthanc: its REST URL, DICOMweb root, credentials and process."""

    url: str
    user: str
    password: str = field(repr=False)
    workdir: Path
    process: subprocess.Popen

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    @property
    def log(self) -> Path:
        return self.workdir / "orthanc.log"

    def running(self) -> bool:
        return self.process.poll() is None

    def request(self, method: str, path: str, **kw) -> requests.Response:
        response = requests.request(method, self.url + path, auth=self.auth, timeout=kw.pop("timeout", 30), **kw)
        response.raise_for_status()
        return response

    def store(self, files: Iterable[str | Path]) -> list[dict]:
        """Store DICOM files through the REST API; returns Orthanc's answer per file."""
        out = []
        for path in files:
            data = Path(path).read_bytes()
            out.append(
                self.request("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"}).json()
            )
        return out

    def series(self) -> list[dict]:
        """Every stored series with its main DICOM tags."""
        return [self.request("GET", f"/series/{sid}").json() for sid in self.request("GET", "/series").json()]

    def stop(self) -> None:
        """Stop the server (its storage stays in ``workdir`` until the caller removes it)."""
        stop_process(self.process)


def write_config(workdir: Path, *, port: int, user: str, password: str, plugin: Path) -> Path:
    """Orthanc's JSON configuration: HTTP on ``port`` for this machine only, auth on, DICOM port off."""
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "fetal-fl-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpServerEnabled": True,
        "HttpPort": int(port),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpDescribeErrors": True,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    path = workdir / "orthanc.json"
    atomic_write_json(path, config, perm=0o600)  # it holds the password
    return path


def start(workdir: str | Path, *, user: str = "fetal", password: str | None = None, timeout_s: float = 60) -> Orthanc:
    """Start Orthanc on a free 127.0.0.1 port and wait until its DICOMweb root answers; raise with the log tail."""
    reason = missing()
    if reason:
        raise RuntimeError(f"cannot start Orthanc: {reason}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    password = password or secrets.token_urlsafe(18)
    port = free_port()
    config = write_config(workdir, port=port, user=user, password=password, plugin=dicomweb_plugin())  # type: ignore[arg-type]
    log = workdir / "orthanc.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(orthanc_binary()), str(config)], cwd=workdir, stdout=out, stderr=subprocess.STDOUT
        )
    server = Orthanc(f"http://127.0.0.1:{port}", user, password, workdir, process)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(requests.RequestException):
            answer = requests.get(f"{server.dicomweb_url}/studies", auth=server.auth, timeout=5)
            if answer.status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within {timeout_s} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def credentials_file(orthanc: Orthanc, path: str | Path) -> Path:
    """Write the PACS credentials as the app reads them (``pacs_credentials`` file, mode 0600)."""
    path = Path(path)
    atomic_write_json(path, {"user": orthanc.user, "password": orthanc.password}, perm=0o600)
    return path


__all__ = ["Orthanc", "credentials_file", "dicomweb_plugin", "missing", "orthanc_binary", "start"]
