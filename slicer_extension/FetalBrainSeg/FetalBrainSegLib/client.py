"""REST client for the project's MONAI Label server, written on ``http.client`` only.

Why not ``requests`` or MONAI Label's own client: Slicer's Python has neither for sure, and both blur *where* a request
failed. Here each request goes through three phases with their own failure meaning, which decides the message and
whether a correction is kept for re-sending:

- connecting fails -> :class:`ServerUnreachableError` (server down, wrong address): nothing reached the server;
- sending/receiving fails -> :class:`ConnectionLostError` (server stopped mid-request), or
  :class:`ServerTimeoutError` when it did not answer in time;
- an HTTP error status -> 401 :class:`TokenRejectedError`, 403 :class:`PermissionDeniedError`, 404
  :class:`NotFoundError`, other 4xx :class:`RequestRejectedError` (with the server's own words), 5xx
  :class:`ServerError`.

Endpoints (MONAI Label 0.8.5): ``GET /info/``, ``POST /activelearning/<strategy>``, ``GET /datastore/?output=all``,
``GET /datastore/image?image=``, ``POST /infer/<model>?image=&output=image``, ``PUT /datastore/label?image=&tag=``,
``GET /datastore/label?label=&tag=``, ``POST /train/<task>``, ``GET /train/``, ``DELETE /train/``. The access token,
when given, is sent as ``Authorization: Bearer <token>`` and never logged.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .atomic import write_bytes_atomic
from .errors import (
    ConnectionLostError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    QcConfirmationRequiredError,
    RequestRejectedError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    TokenRejectedError,
    TrainingAlreadyRunningError,
)
from .volumeio import suffix_of

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # short requests: info, next case, status
TRANSFER_TIMEOUT_S = 300.0  # image download, label upload
INFER_TIMEOUT_S = 900.0  # a 256³ inference takes ~25 s on 2 CPU cores; allow for slow machines and queueing
CONNECT_TIMEOUT_S = 10.0
FINAL_TAG = "final"


@dataclass
class Response:
    """A complete HTTP answer."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8")) if self.body.strip() else None
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(
                "The server answered with something that is not JSON; is this address the fetal brain MONAI Label "
                f"server? ({e})"
            ) from e

    @property
    def filename(self) -> str:
        """Base name from Content-Disposition ('' if none): never a path, so a server cannot steer where we write."""
        name = self.headers.get_filename() or ""
        return os.path.basename(name.replace("\\", "/"))


def normalize_server_url(url: str) -> str:
    """``http(s)://host[:port][/base]`` without trailing slash; a bare ``host:port`` gets ``http://``."""
    text = (url or "").strip()
    if not text:
        raise ValueError("Enter the server address, for example http://127.0.0.1:8000")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url}' is not a server address; it should look like http://127.0.0.1:8000")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"'{url}' has an invalid port number; it should look like http://127.0.0.1:8000") from None
    if parts.query or parts.fragment:
        raise ValueError(f"'{url}' should be only the server address, without '?' or '#' parts")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def encode_multipart(fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]]) -> tuple[str, bytes]:
    """``multipart/form-data`` body: ``fields`` as text parts, ``files`` as ``name: (filename, data, type)``."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in fields.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_q(name)}"\r\n\r\n'.encode()
            + value.encode("utf-8")
            + b"\r\n"
        )
    for name, (filename, data, content_type) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_q(name)}"; filename="{_q(filename)}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        chunks.append(head.encode("utf-8") + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


def _q(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


class MonaiLabelClient:
    """One server, one (optional) token. Every call opens a fresh connection, so a restarted server just works."""

    def __init__(
        self,
        server_url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
        infer_timeout_s: float = INFER_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server_url = normalize_server_url(server_url)
        self.token = (token or "").strip() or None
        self.timeout_s = float(timeout_s)
        self.transfer_timeout_s = float(transfer_timeout_s)
        self.infer_timeout_s = float(infer_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._ssl_context = ssl_context
        parts = urlsplit(self.server_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._base_path = parts.path

    def __repr__(self) -> str:  # never shows the token
        return f"MonaiLabelClient({self.server_url!r}, token={'set' if self.token else 'none'})"

    # ------------------------------------------------------------------------------------------------------------
    # Endpoints
    # ------------------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """``GET /info/``: labels, models, trainers, strategies, model provenance."""
        data = self._request("GET", "/info/", action="read the server's model and labels").json()
        if not isinstance(data, dict) or not ({"models", "labels"} & set(data)):
            raise ProtocolError(
                f"{self.server_url} answered /info/ but not like a MONAI Label server; check the address and port."
            )
        return data

    def next_sample(self, strategy: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """``POST /activelearning/<strategy>``: the next case to annotate, or None when none is left."""
        body = json.dumps(dict(params or {})).encode()
        path = f"/activelearning/{quote(strategy, safe='')}"
        data = self._request("POST", path, body=body, content_type="application/json", action="fetch the next case")
        result = data.json()
        if not result:
            return None
        if not isinstance(result, dict) or not isinstance(result.get("id"), str):
            raise ProtocolError(f"The server's next-case answer has no case id: {result!r}")
        return result

    def list_images(self) -> list[str]:
        """Ids of every image in the server's datastore (for 'Open case')."""
        data = self._request("GET", "/datastore/", query={"output": "all"}, action="list the cases").json()
        objects = data.get("objects") if isinstance(data, dict) else None
        if not isinstance(objects, dict):
            raise ProtocolError("The server's datastore listing has no 'objects'.")
        return sorted(objects)

    def datastore(self) -> dict[str, Any]:
        """The whole datastore description (``/datastore/?output=all``)."""
        data = self._request("GET", "/datastore/", query={"output": "all"}, action="list the cases").json()
        if not isinstance(data, dict):
            raise ProtocolError("The server's datastore listing is not a JSON object.")
        return data

    def download_image(self, image_id: str, dest_dir: str | os.PathLike[str]) -> Path:
        """``GET /datastore/image``: saved atomically as ``<dest_dir>/<image_id><suffix>``."""
        resp = self._request(
            "GET",
            "/datastore/image",
            query={"image": image_id},
            timeout_s=self.transfer_timeout_s,
            action=f"download case '{image_id}'",
        )
        return self._save_volume(resp, Path(dest_dir), _safe_stem(image_id))

    def infer(
        self, model: str, image_id: str, dest_dir: str | os.PathLike[str], params: Mapping[str, Any] | None = None
    ) -> Path:
        """``POST /infer/<model>?image=<id>&output=image``: the segmentation file, saved in ``dest_dir``."""
        content_type, body = encode_multipart({"params": json.dumps(dict(params or {}))}, {})
        resp = self._request(
            "POST",
            f"/infer/{quote(model, safe='')}",
            query={"image": image_id, "output": "image"},
            body=body,
            content_type=content_type,
            timeout_s=self.infer_timeout_s,
            action=f"segment case '{image_id}'",
        )
        return self._save_volume(resp, Path(dest_dir), _safe_stem(image_id) + "_auto")

    def infer_with_report(
        self, model: str, image_id: str, dest_dir: str | os.PathLike[str], params: Mapping[str, Any] | None = None
    ) -> tuple[Path, dict[str, Any]]:
        """``POST /infer/<model>?image=<id>&output=all``: the segmentation file (saved in ``dest_dir``) and the
        server's result parameters (``qc``: tissue volumes checked against the normal range for the GA)."""
        content_type, body = encode_multipart({"params": json.dumps(dict(params or {}))}, {})
        resp = self._request(
            "POST",
            f"/infer/{quote(model, safe='')}",
            query={"image": image_id, "output": "all"},
            body=body,
            content_type=content_type,
            timeout_s=self.infer_timeout_s,
            action=f"segment case '{image_id}'",
        )
        parts = parse_multipart(resp.headers.get("Content-Type", ""), resp.body)
        if "image" not in parts:
            raise ProtocolError("The server's answer to a segmentation request holds no segmentation file.")
        try:
            result = json.loads(parts["params"][1].decode("utf-8")) if "params" in parts else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"The server's segmentation parameters are not JSON ({e}).") from e
        filename, data = parts["image"]
        if not data:
            raise ProtocolError("The server sent an empty file.")
        suffix = suffix_of(os.path.basename(filename.replace("\\", "/"))) or (
            ".nrrd" if data[:4] == b"NRRD" else (".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii")
        )
        path = write_bytes_atomic(Path(dest_dir) / f"{_safe_stem(image_id)}_auto{suffix}", data)
        return path, result if isinstance(result, dict) else {}

    def save_label(
        self,
        image_id: str,
        label_file: bytes,
        *,
        filename: str = "label.nii.gz",
        tag: str = FINAL_TAG,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``PUT /datastore/label?image=<id>&tag=<tag>``: store a label file; returns the server's JSON."""
        content_type, body = encode_multipart(
            {"params": json.dumps(dict(params or {}))}, {"label": (filename, label_file, "application/octet-stream")}
        )
        resp = self._request(
            "PUT",
            "/datastore/label",
            query={"image": image_id, "tag": tag},
            body=body,
            content_type=content_type,
            timeout_s=self.transfer_timeout_s,
            action=f"send the correction of case '{image_id}'",
        )
        result = resp.json()
        return result if isinstance(result, dict) else {}

    def download_label(self, label_id: str, tag: str, dest_dir: str | os.PathLike[str]) -> Path:
        """``GET /datastore/label?label=<id>&tag=<tag>``: the stored label file."""
        resp = self._request(
            "GET",
            "/datastore/label",
            query={"label": label_id, "tag": tag},
            timeout_s=self.transfer_timeout_s,
            action=f"download the '{tag}' label of case '{label_id}'",
        )
        return self._save_volume(resp, Path(dest_dir), f"{_safe_stem(label_id)}_{_safe_stem(tag)}")

    def start_training(self, trainer: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``POST /train/<trainer>``: start fine-tuning; :class:`TrainingAlreadyRunningError` if one runs."""
        body = json.dumps(dict(params or {})).encode()
        try:
            resp = self._request(
                "POST",
                f"/train/{quote(trainer, safe='')}",
                body=body,
                content_type="application/json",
                action="start fine-tuning",
            )
        except RequestRejectedError as e:
            if e.status == 429:
                raise TrainingAlreadyRunningError(
                    "Fine-tuning is already running on the server; watch its status or wait for it to finish.",
                    status=e.status,
                    server_message=e.server_message,
                ) from e
            raise
        result = resp.json()
        return result if isinstance(result, dict) else {}

    def training_status(self) -> dict[str, Any] | None:
        """``GET /train/``: the latest training task, or None if the server never trained."""
        try:
            result = self._request("GET", "/train/", action="read the fine-tuning status").json()
        except NotFoundError:
            return None
        return result if isinstance(result, dict) else None

    def stop_training(self) -> dict[str, Any] | None:
        """``DELETE /train/``: stop the running fine-tuning (None if nothing was running)."""
        result = self._request("DELETE", "/train/", action="stop fine-tuning").json()
        return result if isinstance(result, dict) else None

    # ------------------------------------------------------------------------------------------------------------
    # Transport
    # ------------------------------------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
        action: str,
    ) -> Response:
        timeout = float(timeout_s if timeout_s is not None else self.timeout_s)
        target = self._base_path + path + (("?" + urlencode(dict(query))) if query else "")
        headers = {"Accept": "application/json, */*", "User-Agent": "FetalBrainSeg-Slicer"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        log.debug("%s %s%s (%d bytes)", method, self.server_url, target, len(body or b""))

        conn = self._connection(min(self.connect_timeout_s, timeout))
        try:
            try:
                conn.connect()
            except OSError as e:
                raise ServerUnreachableError(
                    f"Cannot reach the segmentation server at {self.server_url} ({_reason(e)}), so could not "
                    f"{action}. Check that the server is running and that the address is right, then try again.",
                    url=self.server_url,
                ) from e
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                raw = conn.getresponse()
                response = Response(raw.status, raw.msg, raw.read())
            except (socket.timeout, TimeoutError) as e:
                raise ServerTimeoutError(
                    f"The server at {self.server_url} did not answer within {timeout:g} s when asked to {action}. "
                    "It may be busy (fine-tuning or another segmentation); try again in a moment.",
                    url=self.server_url,
                ) from e
            except (OSError, http.client.HTTPException) as e:
                raise ConnectionLostError(
                    f"The connection to the server at {self.server_url} broke while trying to {action} "
                    f"({_reason(e)}); the server may have stopped or restarted. Try again in a moment.",
                    url=self.server_url,
                ) from e
        finally:
            conn.close()

        if response.status >= 400:
            raise self._status_error(response, action)
        return response

    def _connection(self, connect_timeout: float) -> http.client.HTTPConnection:
        if self._https:
            context = self._ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=connect_timeout, context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=connect_timeout)

    def _status_error(self, response: Response, action: str) -> Exception:
        status = response.status
        said = _server_message(response)
        said_part = f" The server says: {said}" if said else ""
        if status == 401:
            return TokenRejectedError(
                f"The server did not accept your access token (missing, invalid or expired), so could not {action}. "
                f"Enter a valid token and press Connect again.{said_part}",
                status=status,
                server_message=said,
            )
        if status == 403:
            return PermissionDeniedError(
                f"Your account is not allowed to {action} on this server. Ask the site administrator for the right "
                f"role.{said_part}",
                status=status,
                server_message=said,
            )
        problems = _server_problems(response) if status == 409 else []
        if any("confirm_qc" in p for p in problems):  # the volume check; said may be cut short, problems are whole
            flags = [p for p in problems if "confirm_qc" not in p]
            listed = "".join(f"\n- {f}" for f in flags)
            return QcConfirmationRequiredError(
                f"The correction was not stored: tissue volumes are far outside the normal range for the gestational "
                f"age:{listed}\nCheck the segmentation; if it is right, confirm to store it anyway.",
                status=status,
                server_message=said,
                flags=flags,
            )
        if status == 404:
            return NotFoundError(
                f"Could not {action}: not found on the server.{said_part}", status=status, server_message=said
            )
        if status < 500:
            return RequestRejectedError(
                f"The server refused to {action} (HTTP {status}).{said_part}", status=status, server_message=said
            )
        return ServerError(
            f"The server had an internal error while trying to {action} (HTTP {status}).{said_part} "
            "Try again later; if it persists, tell the site administrator.",
            status=status,
            server_message=said,
        )

    def _save_volume(self, resp: Response, dest_dir: Path, stem: str) -> Path:
        suffix = suffix_of(resp.filename)
        if not suffix:  # name by content: a NRRD starts with its magic, NIfTI from MONAI Label is gzipped
            suffix = ".nrrd" if resp.body[:4] == b"NRRD" else (".nii.gz" if resp.body[:2] == b"\x1f\x8b" else ".nii")
        if not resp.body:
            raise ProtocolError("The server sent an empty file.")
        return write_bytes_atomic(dest_dir / f"{stem}{suffix}", resp.body)


def _server_message(response: Response) -> str:
    """The server's explanation: FastAPI's ``{"detail": ...}`` (text or a list of field errors) or plain text."""
    text = response.body[:4000].decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    detail = data.get("detail", data.get("message", data.get("error"))) if isinstance(data, dict) else data
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)[:500]
    return str(detail)[:500] if detail is not None else text[:500]


def _server_problems(response: Response) -> list[str]:
    """The server's ``problems`` list (one sentence each), or []."""
    try:
        data = json.loads(response.body[:256_000].decode("utf-8", errors="replace"))
    except ValueError:
        return []
    problems = data.get("problems") if isinstance(data, dict) else None
    return [str(p) for p in problems] if isinstance(problems, list) else []


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """``{name: (filename, bytes)}`` of a ``multipart/form-data`` answer (MONAI Label's ``output=all``)."""
    boundary = ""
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not content_type.lower().startswith("multipart/") or not boundary:
        raise ProtocolError(f"Expected a multipart answer from the server, got '{content_type or 'no type'}'.")
    parts: dict[str, tuple[str, bytes]] = {}
    for chunk in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        name = filename = ""
        for line in head.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                for item in line.split(";")[1:]:
                    key, _, value = item.strip().partition("=")
                    if key.lower() == "name":
                        name = value.strip('"')
                    elif key.lower() == "filename":
                        filename = value.strip('"')
        if name:
            parts[name] = (filename, data)
    return parts


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "unknown host name"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(error, ssl.SSLError):
        return f"secure connection failed: {error.reason or error}"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(error, http.client.IncompleteRead):
        return "the answer was cut off"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, BrokenPipeError):
        return "connection closed while sending"
    return str(error) or type(error).__name__


def _safe_stem(text: str) -> str:
    """A file-name-safe version of a case id (ids come from the server; never let them make paths)."""
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in text).strip("._")
    return cleaned[:120] or "case"
