"""The client's failure mapping, against real (tiny, stdlib) HTTP servers on 127.0.0.1 that misbehave on purpose.

These servers stand for what MONAI Label cannot be made to do on demand: refuse a token (auth arrives with issue 7),
drop a connection half-way, hang. The real MONAI Label server is exercised in ``test_server_flow.py``.
"""

from __future__ import annotations

import email.parser
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from FetalBrainSegLib.client import MonaiLabelClient, encode_multipart, normalize_server_url
from FetalBrainSegLib.errors import (
    ConnectionLostError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RequestRejectedError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    TokenRejectedError,
    TrainingAlreadyRunningError,
    is_retryable,
)

from ...conftest import free_port


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class TinyServer:
    """A real HTTP server whose answer per request is a Python function of the request."""

    url: str
    requests: list[Seen] = field(default_factory=list)
    respond: Callable[[Seen, BaseHTTPRequestHandler], None] | None = None


def send(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {"Content-Type": "application/json"}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def tiny() -> Iterator[TinyServer]:
    state = TinyServer(url="")
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            parts = urlsplit(self.path)
            seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers), self.rfile.read(n))
            state.requests.append(seen)
            assert state.respond is not None
            self.release = release  # type: ignore[attr-defined]
            state.respond(seen, self)

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815 - http.server's names

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    release.set()
    httpd.shutdown()
    httpd.server_close()


INFO = {"name": "fetal_brain", "labels": {"background": 0, "a": 1}, "models": {"m": {"type": "segmentation"}}}


def test_unreachable_server_is_named_and_retryable():
    port = free_port()  # nothing listens there
    with pytest.raises(ServerUnreachableError) as err:
        MonaiLabelClient(f"http://127.0.0.1:{port}").info()
    text = str(err.value)
    assert f"Cannot reach the segmentation server at http://127.0.0.1:{port} (connection refused)" in text
    assert "Check that the server is running" in text
    assert is_retryable(err.value)


def test_token_is_sent_as_bearer_and_never_shown(tiny, caplog):
    tiny.respond = lambda seen, h: send(h, 200, INFO)
    client = MonaiLabelClient(tiny.url, token="  s3cret-token ")
    with caplog.at_level(logging.DEBUG, logger="FetalBrainSegLib"):
        assert client.info()["name"] == "fetal_brain"
    assert tiny.requests[0].headers["Authorization"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(client)
    assert "s3cret" not in caplog.text
    MonaiLabelClient(tiny.url, token="").info()
    assert "Authorization" not in tiny.requests[1].headers


def test_401_and_403_become_clear_auth_errors(tiny):
    def respond(seen: Seen, h: BaseHTTPRequestHandler) -> None:
        if seen.path.startswith("/train/"):
            send(h, 403, {"detail": "role annotator may not train"})
        else:
            send(
                h, 401, {"detail": "token expired"}, {"WWW-Authenticate": "Bearer", "Content-Type": "application/json"}
            )

    tiny.respond = respond
    client = MonaiLabelClient(tiny.url, token="old")
    with pytest.raises(TokenRejectedError) as err:
        client.info()
    assert err.value.status == 401
    assert "did not accept your access token (missing, invalid or expired)" in str(err.value)
    assert "token expired" in str(err.value)
    with pytest.raises(PermissionDeniedError) as err2:
        client.start_training("m")
    assert "not allowed to start fine-tuning" in str(err2.value)
    assert "role annotator may not train" in str(err2.value)
    assert is_retryable(err.value) and is_retryable(err2.value)  # the correction itself is fine: keep it


def test_rejections_carry_the_servers_words_and_are_not_retryable(tiny):
    def respond(seen: Seen, h: BaseHTTPRequestHandler) -> None:
        if seen.method == "PUT":
            detail = [{"loc": ["body", "label"], "msg": "label values [9] outside 0..7"}]
            send(h, 422, {"detail": detail})
        elif seen.path == "/datastore/image":
            send(h, 404, {"detail": "Image NOT Found"})
        elif seen.path.startswith("/train/"):
            send(h, 429, {"detail": "Train Task is Already Running"})
        else:
            send(h, 500, b"Internal Server Error", {"Content-Type": "text/plain"})

    tiny.respond = respond
    client = MonaiLabelClient(tiny.url)
    with pytest.raises(RequestRejectedError) as err:
        client.save_label("case1", b"nifti")
    assert "refused to send the correction of case 'case1' (HTTP 422)" in str(err.value)
    assert "label: label values [9] outside 0..7" in str(err.value)
    assert not is_retryable(err.value)
    with pytest.raises(NotFoundError, match="Image NOT Found"):
        client.download_image("nope", "/nonexistent-never-written")
    with pytest.raises(TrainingAlreadyRunningError, match="already running"):
        client.start_training("m")
    with pytest.raises(ServerError) as err5:
        client.info()
    assert "internal error" in str(err5.value) and "Internal Server Error" in str(err5.value)
    assert is_retryable(err5.value)


def test_connection_dropped_mid_request_is_connection_lost(tiny):
    def respond(seen: Seen, h: BaseHTTPRequestHandler) -> None:
        if seen.path == "/info/":  # answer cut off half-way
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b'{"labels": ')
            h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)  # otherwise: request read, then the server is gone
        h.close_connection = True

    tiny.respond = respond
    client = MonaiLabelClient(tiny.url)
    with pytest.raises(ConnectionLostError) as err:
        client.save_label("case1", b"x" * 100_000)
    assert "broke while trying to send the correction of case 'case1'" in str(err.value)
    assert is_retryable(err.value)
    with pytest.raises(ConnectionLostError, match="cut off"):
        client.info()


def test_a_server_that_does_not_answer_times_out(tiny):
    # the server holds its answer for 30 s: a client without a working timeout gets it and raises nothing
    tiny.respond = lambda seen, h: h.release.wait(30)  # type: ignore[attr-defined]
    client = MonaiLabelClient(tiny.url, timeout_s=0.5)
    with pytest.raises(ServerTimeoutError) as err:
        client.info()
    assert "did not answer within 0.5 s when asked to read the server's model and labels" in str(err.value)
    assert "busy" in str(err.value)
    assert isinstance(err.value, ConnectionLostError) and is_retryable(err.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"<html>nginx</html>", "not JSON"), (json.dumps({"hello": 1}).encode(), "not like a MONAI Label server")],
)
def test_something_else_on_that_port_is_a_protocol_error(tiny, body, message):
    tiny.respond = lambda seen, h: send(h, 200, body, {"Content-Type": "text/html"})
    with pytest.raises(ProtocolError, match=message):
        MonaiLabelClient(tiny.url).info()


def test_label_upload_is_a_well_formed_multipart_put(tiny):
    tiny.respond = lambda seen, h: send(h, 200, {"image": "c 1", "label": "c 1"})
    result = MonaiLabelClient(tiny.url).save_label("c 1", b"\x00\x01label", filename="c_1.nii.gz", params={"k": 1})
    assert result == {"image": "c 1", "label": "c 1"}
    seen = tiny.requests[0]
    assert (seen.method, seen.path, seen.query) == ("PUT", "/datastore/label", {"image": ["c 1"], "tag": ["final"]})
    msg = email.parser.BytesParser().parsebytes(
        f"Content-Type: {seen.headers['Content-Type']}\r\n\r\n".encode() + seen.body
    )
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    assert json.loads(parts["params"].get_payload()) == {"k": 1}
    assert parts["label"].get_filename() == "c_1.nii.gz"
    assert parts["label"].get_payload(decode=True) == b"\x00\x01label"


def test_downloads_never_write_where_the_server_says(tiny, tmp_path):
    payload = b"\x1f\x8b" + b"fake-gzip"
    disposition = 'attachment; filename="../../evil.nii.gz"'
    tiny.respond = lambda seen, h: send(h, 200, payload, {"Content-Disposition": disposition})
    path = MonaiLabelClient(tiny.url).download_image("../x/y", tmp_path / "case")
    assert path.parent == tmp_path / "case"
    assert path.name == "x_y.nii.gz"
    assert path.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["case", "x_y.nii.gz"]


def test_active_learning_and_training_requests(tiny):
    answers = {
        "/activelearning/random": {"id": "case7", "path": "/srv/studies/case7.nii.gz"},
        "/activelearning/entropy": {},
        "/train/": {"status": "RUNNING", "start_ts": "2026-01-01 10:00:00"},
        "/train/m": {"status": "SUBMITTED"},
    }
    tiny.respond = lambda seen, h: send(h, 200, answers[seen.path])
    client = MonaiLabelClient(tiny.url)
    assert client.next_sample("random", {"client_id": "me"})["id"] == "case7"
    assert json.loads(tiny.requests[0].body) == {"client_id": "me"}
    assert client.next_sample("entropy") is None
    assert client.start_training("m", {"max_epochs": 1}) == {"status": "SUBMITTED"}
    assert json.loads(tiny.requests[2].body) == {"max_epochs": 1}
    assert client.training_status()["status"] == "RUNNING"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        (" http://host:8000/ ", "http://host:8000"),
        ("https://site.example/monailabel/", "https://site.example/monailabel"),
    ],
)
def test_server_address_normalisation(text, expected):
    assert normalize_server_url(text) == expected


@pytest.mark.parametrize("text", ["", "ftp://x", "http://", "http://h:99999", "http://h:1/?a=b"])
def test_bad_server_addresses_are_explained(text):
    with pytest.raises(ValueError, match=r"server address|port|without"):
        normalize_server_url(text)


def test_multipart_escapes_quotes_in_names():
    ctype, body = encode_multipart({"params": "{}"}, {"label": ('a"b.nii.gz', b"x", "application/octet-stream")})
    assert b'filename="a\\"b.nii.gz"' in body
    assert ctype.startswith("multipart/form-data; boundary=")
