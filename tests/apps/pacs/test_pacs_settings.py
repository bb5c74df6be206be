"""PACS settings without a PACS: credentials never on the command line, file permissions, URL rules, ids."""

from __future__ import annotations

import json
import os

import pytest

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.dicomweb_store import PacsDatastore, check_uid, read_credentials
from apps.fetal_brain.lib.errors import BadRequestError, NotFoundError


def test_password_on_the_command_line_is_refused():
    with pytest.raises(ValueError, match="must not be passed with --conf"):
        AppConfig.from_conf({"pacs_password": "secret"}, env={})
    config = AppConfig.from_conf({"pacs_timeout_s": "5"}, env={"FETAL_BRAIN_PACS_PASSWORD": "s3cr3t-pw"})
    assert config.pacs_timeout_s == 5.0 and "s3cr3t-pw" not in repr(config)


def test_credentials_file_must_be_private(tmp_path):
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"user": "u", "password": "p"}))
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_credentials(path, env={})
    os.chmod(path, 0o600)
    assert read_credentials(path, env={}) == ("u", "p")
    assert read_credentials(None, env={"FETAL_BRAIN_PACS_USER": "a", "FETAL_BRAIN_PACS_PASSWORD": "b"}) == ("a", "b")
    assert read_credentials(None, env={}) is None
    with pytest.raises(ValueError, match="without FETAL_BRAIN_PACS_USER"):
        read_credentials(None, env={"FETAL_BRAIN_PACS_PASSWORD": "b"})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://pacs/dicom-web", "not an http"),
        ("http://user:pw@127.0.0.1:1/dicom-web", "not in the URL"),
        ("http://pacs.example.org/dicom-web", "plain http"),
    ],
)
def test_unsafe_urls_are_refused(tmp_path, url, message):
    with pytest.raises(ValueError, match=message):
        PacsDatastore(url, tmp_path, credentials=("u", "p"))


def test_ids_must_be_dicom_uids():
    assert check_uid("1.2.840.10008.5") == "1.2.840.10008.5"
    with pytest.raises(BadRequestError):
        check_uid("../etc")
    with pytest.raises(NotFoundError):
        check_uid("case01")
    with pytest.raises(NotFoundError):
        check_uid("1." + "2" * 70)


def test_missing_orthanc_names_the_package(monkeypatch):
    from apps.fetal_brain import orthanc

    monkeypatch.setattr(orthanc, "orthanc_binary", lambda: None)
    monkeypatch.setattr(orthanc, "dicomweb_plugin", lambda: None)
    reason = orthanc.missing()
    assert reason is not None and "orthanc, orthanc-dicomweb" in reason
    with pytest.raises(RuntimeError, match="apt-get install"):
        orthanc.start("/nonexistent-never-created")


def test_a_cache_belongs_to_one_pacs(tmp_path):
    from fetalseg.plumbing import free_port

    first = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: the store starts with its cache only
    store = PacsDatastore(first, tmp_path / "cache", timeout_s=2)
    assert store.list_images() == []
    PacsDatastore(first, tmp_path / "cache", timeout_s=2)  # the same PACS again: fine
    with pytest.raises(ValueError, match="holds series of"):
        PacsDatastore(f"http://127.0.0.1:{free_port()}/other", tmp_path / "cache", timeout_s=2)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "case.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a PACS cache"):
        PacsDatastore(first, tmp_path / "studies", timeout_s=2)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [(401, b"", "refused our credentials"), (500, b"", "answered HTTP 500"), (200, b"not json", "cannot be read")],
)
def test_a_misbehaving_pacs_is_424_with_the_reason(tmp_path, status, body, message):
    """A real HTTP server on 127.0.0.1 standing in for a broken PACS (not a mock of Orthanc: of its failures)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from apps.fetal_brain.lib.dicomweb_store import PacsUnavailableError

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        store = PacsDatastore(url, tmp_path / "cache", credentials=("u", "p"), timeout_s=5)
        with pytest.raises(PacsUnavailableError, match=message) as caught:
            store.check_image("1.2.3.4")
        assert caught.value.status == 424
    finally:
        server.shutdown()
