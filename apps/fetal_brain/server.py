"""ASGI front of the fetal brain MONAI Label server: start MONAI Label with
``--uvicorn_app apps.fetal_brain.server:app``.

It wraps stock ``monailabel.app:app`` (lifespan, /info/, /docs, downloads, training status all stay MONAI Label's)
and, without patching the installed package:

* answers only the routes this app supports: sessions, DICOMweb proxy, WSI, batch inference, scoring, OHIF and
  model upload are refused with 404, so nothing outside the studies folder is reachable through the API;
* checks every ``image``/``id``/``label``/``tag`` query parameter (400 for a path-like id, 404 for an unknown image)
  before a body is read, and bounds every request body (413 over ``max_upload_mb`` for uploads, 1 MiB elsewhere);
* serves the upload and model routes from :mod:`apps.fetal_brain.routes` (checked input, inference in a worker
  pool so ``GET /info/`` keeps answering during a 256³ inference);
* refuses clients and ``Host`` headers that are not this machine unless ``--conf allow_remote true`` (the stock
  launcher binds 0.0.0.0 by default; this also stops DNS-rebinding pages in a local browser), and limits CORS to
  the server's own origin (or the ``cors_origins`` setting);
* with ``--conf auth true`` requires ``Authorization: Bearer <token>`` with a role allowed for the route on every
  request but ``GET /health`` (401 no/invalid/expired token, 403 role too low; see :mod:`apps.fetal_brain.lib.auth`)
  and refuses to start with auth off when bound to a non-loopback address or serving remote clients.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from monailabel.config import settings
from starlette.responses import JSONResponse
from starlette.routing import Match

from apps.fetal_brain.lib.config import AppConfig

log = logging.getLogger(__name__)

Scope = dict[str, Any]
SMALL_BODY = 1 << 20
DRAIN_CAP = 256 << 20  # read (and discard) at most this much of a refused body so the client sees the answer
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}

# (method, path prefix) pairs passed to stock MONAI Label; anything else not served by the front is refused
_INNER_ROUTES: tuple[tuple[str, str], ...] = (
    ("OPTIONS", "/"),  # CORS pre-flight: answered by MONAI Label's CORS middleware (same origin unless configured)
    ("GET", "/info/"),
    ("GET", "/datastore/"),
    ("HEAD", "/datastore/"),
    ("PUT", "/datastore/image/info"),
    ("PUT", "/datastore/label/info"),
    ("PUT", "/datastore/updatelabelinfo"),
    ("DELETE", "/datastore/"),
    ("GET", "/train/"),
    ("DELETE", "/train/"),
    ("GET", "/model/"),
    ("GET", "/logs/"),
)
_INNER_EXACT = {("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/favicon.ico")}
_ID_PARAMS = {"image": "image id", "id": "image id", "label": "label id"}


def _restrict_cors() -> None:
    """CORS for the app's ``cors_origins`` only, else same-origin (stock default is every origin, with cookies)."""
    configured = AppConfig.from_conf(settings.MONAI_LABEL_APP_CONF).cors_origins
    if configured:
        settings.MONAI_LABEL_CORS_ORIGINS = list(configured)
    elif not settings.MONAI_LABEL_CORS_ORIGINS or "*" in settings.MONAI_LABEL_CORS_ORIGINS:
        port = settings.MONAI_LABEL_SERVER_PORT
        settings.MONAI_LABEL_CORS_ORIGINS = [
            f"{scheme}://{host}:{port}" for scheme in ("http", "https") for host in ("127.0.0.1", "localhost")
        ]


_restrict_cors()

from monailabel.app import app as stock_app  # noqa: E402  (reads the CORS setting at import)
from monailabel.interfaces.utils.app import app_instance  # noqa: E402

from apps.fetal_brain.lib.auth import HEALTH_PATH, AuthError, UserStore, users_file  # noqa: E402
from apps.fetal_brain.lib.errors import InputError  # noqa: E402
from apps.fetal_brain.lib.ids import check_tag, id_problem  # noqa: E402
from apps.fetal_brain.lib.uploads import remove_private_dir  # noqa: E402
from apps.fetal_brain.routes import (  # noqa: E402
    BodyTooLargeError,
    build_front,
    error_response,
    install_error_handlers,
)


def _is_local(host: str | None) -> bool:
    if host is None:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOCAL_HOSTS


def _host_header(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"host":
            text = value.decode("latin-1").strip()
            if text.startswith("["):
                return text[: text.find("]") + 1]
            return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


def bound_host(argv: list[str] | None = None) -> str:
    """The address uvicorn binds, from the ``start_server`` command line (MONAI Label's default is 0.0.0.0)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0" if any(a == "start_server" for a in argv) else "127.0.0.1"


def check_exposure(config: AppConfig, host: str) -> None:
    """Refuse (RuntimeError) to serve other machines without authentication: the stock server would serve anyone."""
    if config.auth:
        return
    if config.allow_remote or not _is_local(host):
        raise RuntimeError(
            f"refusing to start: bound to {host!r}"
            + (" with allow_remote" if config.allow_remote else "")
            + " but authentication is off; add '--conf auth true' and create tokens with 'fetal-fl app user add', "
            "or bind 127.0.0.1"
        )


class FetalBrainServer:
    """The ASGI app uvicorn runs: policy, limits and checks in front of stock MONAI Label (see module doc)."""

    def __init__(self, inner: Any, *, config: AppConfig, users: UserStore | None = None) -> None:
        self.inner = inner
        self.config = config
        self.users = users if users is not None else (UserStore(users_file(config.users_file)) if config.auth else None)
        if self.users is not None:
            active = [r for r in self.users.list() if r["active"]]  # also: a corrupt file fails here, at start-up
            if not active:
                log.warning("auth is on but %s holds no active token: every request will get 401", self.users.path)
        self.infer_pool = ThreadPoolExecutor(max_workers=config.infer_workers, thread_name_prefix="infer")
        self.front = build_front(
            max_upload_bytes=config.max_upload_bytes, infer_pool=self.infer_pool, audit_log=config.audit_log
        )
        install_error_handlers(inner)  # stock routes that reach the datastore answer 4xx too

    # -- ASGI -----------------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.inner(scope, receive, send)
            finally:  # server shutdown: drop queued inferences and this process's uploads
                self.infer_pool.shutdown(wait=False, cancel_futures=True)
                remove_private_dir()
            return
        if scope["type"] != "http":  # websockets: none offered
            await send({"type": "websocket.close", "code": 1008})
            return
        method, path = scope["method"], scope["path"]
        if not self.config.allow_remote:
            client = scope.get("client")
            if not _is_local(client[0] if client else None) or not _is_local(_host_header(scope)):
                await self._refuse(scope, receive, send, 403, "this server only serves this machine (allow_remote)")
                return
        if method in ("GET", "HEAD") and path == HEALTH_PATH:  # liveness only: says nothing about the data
            await JSONResponse({"status": "ok"})(scope, receive, send)
            return
        if self.users is not None:
            try:
                principal = self.users.authorize(_header(scope, b"authorization"), method, path)
            except AuthError as exc:
                await self._refuse(scope, receive, send, exc.status, str(exc))
                return
            except ValueError as exc:  # unreadable users file: fail closed, say why in the log only
                log.error("auth: %s", exc)
                await self._refuse(scope, receive, send, 503, "authentication is misconfigured on the server")
                return
            if principal is not None:
                scope.setdefault("state", {})["principal"] = principal
        front = self._front_matches(scope)
        if not front and not self._inner_allows(method, path):
            await self._refuse(scope, receive, send, 404, f"{method} {path} is not offered by this server")
            return
        uploads = front and (path.startswith("/infer/") or (method == "PUT" and path.startswith("/datastore/")))
        limit = self.config.max_upload_bytes if uploads else SMALL_BODY
        length = _content_length(scope)
        if length is not None and (length < 0 or length > limit):
            status, detail = (400, "bad Content-Length") if length < 0 else (413, f"body over the {limit}-byte limit")
            await self._refuse(scope, receive, send, status, detail)
            return
        try:
            self._check_query(method, path, scope)
        except InputError as exc:
            await self._refuse(scope, receive, send, exc.status, str(exc))
            return
        if front:
            await self.front(scope, _limited(receive, limit), send)
            return
        if method == "GET" and path == "/datastore/image":
            _prefetch_download(scope)
        replay, within = await _buffered(receive, limit)
        if not within:
            await error_response(413, f"body over the {limit}-byte limit")(scope, replay, send)
            return
        await self.inner(scope, replay, send)

    # -- policy ---------------------------------------------------------------------------------------------------
    def _front_matches(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] == Match.FULL for route in self.front.router.routes)

    @staticmethod
    def _inner_allows(method: str, path: str) -> bool:
        if (method, path) in _INNER_EXACT:
            return True
        return any(method == m and (path == p or path.startswith(p)) for m, p in _INNER_ROUTES)

    @staticmethod
    def _check_query(method: str, path: str, scope: Scope) -> None:
        """Ids and tags in the query string: 400 if path-like, 404 if the image is unknown (before any body)."""
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        uploading = method == "PUT" and path in ("/datastore/", "/datastore/image")
        for key, what in _ID_PARAMS.items():
            if key not in query or (key == "image" and query[key] == "" and path.startswith("/infer/")):
                continue
            problem = id_problem(query[key], what=what)
            if problem:
                raise InputError(problem, status=400)
            if not uploading and path.startswith(("/infer/", "/datastore/")):
                datastore = app_instance().datastore()  # a PACS datastore checks without fetching the series
                getattr(datastore, "check_image", datastore.image_file)(query[key])
        if query.get("tag"):
            check_tag(query["tag"])

    @staticmethod
    async def _refuse(scope: Scope, receive: Any, send: Any, status: int, detail: str) -> None:
        """Answer ``status`` after draining (up to a cap) the body the client is still sending."""
        drained = 0
        more = True
        while more and drained < DRAIN_CAP and (_content_length(scope) or 0) > 0:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = error_response(status, detail)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="fetal-brain"'
        await response(scope, receive, send)


def _prefetch_download(scope: Scope) -> None:
    """A client downloading an image (to show it) runs the model on it next: prepare it for that /infer (the id was
    checked by ``_check_query``)."""
    image = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("image")
    prefetch = getattr(app_instance(), "prefetch", None)
    if image and prefetch is not None:
        prefetch(image)


def _limited(receive: Any, limit: int) -> Any:
    """``receive`` that raises 413 once more than ``limit`` body bytes arrived (after draining the rest)."""
    total = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                drained, more = 0, message.get("more_body", False)
                while more and drained < DRAIN_CAP:
                    extra = await receive()
                    drained += len(extra.get("body", b""))
                    more = extra.get("more_body", False) and extra["type"] == "http.request"
                raise BodyTooLargeError(limit)
        return message

    return wrapped


async def _buffered(receive: Any, limit: int) -> tuple[Any, bool]:
    """Read a small body completely and hand it on as a fresh ``receive``; False if it passed ``limit``."""
    chunks: list[bytes] = []
    total, more = 0, True
    while more and total <= DRAIN_CAP:
        message = await receive()
        if message["type"] != "http.request":
            break
        if total <= limit:
            chunks.append(message.get("body", b""))
        total += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, total <= limit


def create_app() -> FetalBrainServer:
    """The wrapped server, configured from the app's ``--conf`` settings (and ``FETAL_BRAIN_*`` variables)."""
    config = AppConfig.from_conf(settings.MONAI_LABEL_APP_CONF)
    check_exposure(config, bound_host())
    return FetalBrainServer(stock_app, config=config)


app = create_app()
