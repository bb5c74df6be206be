"""Token auth, roles, TLS and CORS against a real server (``--conf auth true``, HTTPS with a self-signed certificate).

Every route of the app's route table (the front's FastAPI routes and the stock routes it passes on) is requested
with no token, forged tokens, an expired and a revoked token (401), the wrong role (403) and the right role (passes
auth: the handler answers). The test fails if a route is added to the server without an entry here.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from apps.fetal_brain.launcher import LocalServer, start
from apps.fetal_brain.lib.auth import TOKEN_PREFIX, UserStore, required_role
from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import MODEL, write_studies
from tests.conftest import sphere_case
from tests.security.certs import self_signed

pytestmark = pytest.mark.integration

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer_extension" / "FetalBrainSeg"
ALLOWED_ORIGIN = "https://viewer.hospital.example"


@dataclass
class AuthServer:
    url: str
    cert: Path
    studies: Path
    tokens: dict[str, str]
    running: LocalServer
    files: dict[str, bytes] = field(default_factory=dict)

    def request(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = token if token.startswith(("Basic", "Bearer")) else f"Bearer {token}"
        return requests.request(method, self.url + path, headers=headers, verify=str(self.cert), timeout=120, **kw)


def _nifti_bytes(tmp: Path, name: str, array: np.ndarray, affine: np.ndarray, dtype: Any = None) -> bytes:
    path = write_nifti(array, affine, tmp / f"{name}.nii.gz", **({"dtype": dtype} if dtype else {}))
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    root = tmp_path_factory.mktemp("auth_server")
    studies = root / "studies"
    write_studies(studies)
    users = UserStore(root / "users.json")
    tokens = {role: users.add(f"{role}-user", role) for role in ("annotator", "trainer", "admin")}
    tokens["expired"] = users.add("old-user", "admin", expires_at=time.time() - 60)
    tokens["revoked"] = users.add("gone-user", "admin")
    users.revoke("gone-user")
    cert, key = self_signed(root / "tls")
    conf = [
        ("variant", "tiny"),
        ("model_path", str(root / "model" / "model.pt")),
        ("auth", "true"),
        ("users_file", str(users.path)),
        ("cors_origins", ALLOWED_ORIGIN),
    ]
    running = start(studies, workdir=root, conf=conf, ssl_certfile=cert, ssl_keyfile=key)
    image, label, affine = sphere_case(shape=(32, 32, 32), seed=2)  # case02's own grid (see write_studies)
    files = {
        "image": _nifti_bytes(root, "upload_image", image, affine),
        "label": _nifti_bytes(root, "upload_label", label, affine, np.uint8),
    }
    try:
        yield AuthServer(running.url, cert, studies, tokens, running, files)
    finally:
        running.stop()


# (method, route as in the route table) -> (least role, concrete request kwargs builder, statuses of "it works")
def _image(name: str):
    return lambda s: {"params": {"image": name}, "files": {"file": (f"{name}.nii.gz", s.files["image"])}}


ROUTES: dict[tuple[str, str], tuple[str | None, Any, set[int]]] = {
    ("POST", "/infer/{model}"): (
        "annotator",
        lambda s: {"path": f"/infer/{MODEL}", "params": {"image": "case02", "output": "json"}},
        {200},
    ),
    ("PUT", "/datastore/"): ("trainer", _image("auth_legacy"), {200}),
    ("PUT", "/datastore/image"): ("trainer", _image("auth_new"), {200}),
    ("PUT", "/datastore/label"): (
        "annotator",
        lambda s: {"params": {"image": "case02", "tag": "final"}, "files": {"label": ("l.nii.gz", s.files["label"])}},
        {200},
    ),
    ("POST", "/activelearning/{strategy}"): (
        "annotator",
        lambda s: {"path": "/activelearning/random", "json": {}},
        {200},
    ),
    ("POST", "/train/{model}"): ("trainer", lambda s: {"path": f"/train/{MODEL}", "json": {"max_epochs": -1}}, {400}),
    ("POST", "/train/"): ("trainer", lambda s: {"json": {MODEL: 5}}, {400}),
    ("OPTIONS", "/"): (None, lambda s: {"path": "/info/", "headers": _preflight(ALLOWED_ORIGIN)}, {200}),
    ("GET", "/info/"): ("annotator", lambda s: {}, {200}),
    ("GET", "/datastore/"): ("annotator", lambda s: {"params": {"output": "all"}}, {200}),
    ("HEAD", "/datastore/"): ("annotator", lambda s: {}, {200, 405}),
    ("PUT", "/datastore/image/info"): ("trainer", lambda s: {"params": {"image": "case03"}, "json": {}}, {200, 422}),
    ("PUT", "/datastore/label/info"): (
        "trainer",
        lambda s: {"params": {"label": "case00", "tag": "final"}, "json": {}},
        {200, 422},
    ),
    ("PUT", "/datastore/updatelabelinfo"): (
        "trainer",
        lambda s: {"params": {"label": "case00", "tag": "final"}, "json": {}},
        {200, 422},
    ),
    ("DELETE", "/datastore/"): ("trainer", lambda s: {"params": {"id": "no_such_case"}}, {404}),
    ("GET", "/train/"): ("trainer", lambda s: {}, {200, 404}),  # 404: no training run yet
    ("DELETE", "/train/"): ("trainer", lambda s: {}, {200}),
    ("GET", "/model/"): ("trainer", lambda s: {"path": f"/model/{MODEL}"}, {200, 404, 500}),
    # the front's own download: the shared part only (403 for a model holding this site's local part)
    ("GET", "/model/{model}"): ("trainer", lambda s: {"path": f"/model/{MODEL}"}, {200, 403, 404}),
    ("GET", "/logs/"): ("trainer", lambda s: {}, {200}),
    ("GET", "/"): ("annotator", lambda s: {"allow_redirects": False}, {200, 307}),
    ("GET", "/docs"): ("annotator", lambda s: {}, {200}),
    ("GET", "/openapi.json"): ("annotator", lambda s: {}, {200}),
    ("GET", "/favicon.ico"): ("annotator", lambda s: {}, {200, 404}),
    ("GET", "/health"): (None, lambda s: {}, {200}),
}
PROTECTED = sorted(k for k, v in ROUTES.items() if v[0] is not None)
TRAINER_ONLY = sorted(k for k, v in ROUTES.items() if v[0] == "trainer")


def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}


def _call(server: AuthServer, key: tuple[str, str], token: str | None) -> requests.Response:
    method, route = key
    kw = ROUTES[key][1](server)
    path = kw.pop("path", route)
    return server.request(method, path, token, **kw)


def _forged(server: AuthServer) -> dict[str, str]:
    token_id = server.tokens["admin"].split(".")[1]
    return {
        "wrong secret for a real id": f"{TOKEN_PREFIX}.{token_id}.{'A' * 43}",
        "unknown id": f"{TOKEN_PREFIX}.0123456789ab.{'B' * 43}",
        "jwt-like": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
        "basic auth": "Basic YWRtaW46YWRtaW4=",
        "empty bearer": "Bearer ",
    }


def test_the_route_table_is_covered():
    """Every route the server offers (front + stock pass-through) has an entry above, with the server's role."""
    from apps.fetal_brain import server as srv

    table = {(m, p) for m, p in srv._INNER_ROUTES} | set(srv._INNER_EXACT)
    for route in srv.app.front.router.routes:
        table |= {(m, route.path) for m in route.methods}
    table.add(("GET", "/health"))
    assert table == set(ROUTES)
    for (method, route), (role, _, _) in ROUTES.items():
        assert required_role(method, route.replace("{model}", MODEL).replace("{strategy}", "random")) == role


@pytest.mark.parametrize("key", PROTECTED, ids=lambda k: f"{k[0]} {k[1]}")
def test_protected_routes_refuse_missing_forged_expired_and_revoked_tokens(auth_server, key):
    before = sorted(p.name for p in auth_server.studies.rglob("*"))
    for what, token in {
        "no token": None,
        **_forged(auth_server),
        "expired": auth_server.tokens["expired"],
        "revoked": auth_server.tokens["revoked"],
    }.items():
        response = _call(auth_server, key, token)
        assert response.status_code == 401, (what, response.status_code, response.text)
        assert response.headers.get("www-authenticate", "").startswith("Bearer")
        secret = (token or "").split(".")[-1]
        assert len(secret) < 20 or secret not in response.text  # a token's secret is never echoed
    assert sorted(p.name for p in auth_server.studies.rglob("*")) == before  # nothing stored
    if key[0] != "HEAD":  # a HEAD answer has no body
        assert _call(auth_server, key, auth_server.tokens["expired"]).json()["detail"].startswith("token expired")


@pytest.mark.parametrize("key", TRAINER_ONLY, ids=lambda k: f"{k[0]} {k[1]}")
def test_trainer_routes_refuse_an_annotator(auth_server, key):
    response = _call(auth_server, key, auth_server.tokens["annotator"])
    assert response.status_code == 403, response.text
    assert "annotator" in response.json()["detail"]


@pytest.mark.parametrize("key", sorted(ROUTES), ids=lambda k: f"{k[0]} {k[1]}")
def test_the_right_role_passes(auth_server, key):
    role, _, ok = ROUTES[key]
    response = _call(auth_server, key, auth_server.tokens[role] if role else None)
    assert response.status_code in ok, response.text[:500]
    if role == "annotator":  # roles are ordered: a trainer and an admin may do what an annotator may
        assert _call(auth_server, key, auth_server.tokens["admin"]).status_code not in (401, 403)


def test_cors_allows_only_the_configured_origin(auth_server):
    good = auth_server.request("OPTIONS", "/info/", headers=_preflight(ALLOWED_ORIGIN))
    assert good.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN
    bad = auth_server.request("OPTIONS", "/info/", headers=_preflight("https://evil.example"))
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    simple = auth_server.request(
        "GET", "/info/", auth_server.tokens["annotator"], headers={"Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in simple.headers


def test_tls_is_required_and_verified(auth_server):
    with pytest.raises(requests.ConnectionError):  # plain HTTP to the TLS port
        requests.get(auth_server.url.replace("https://", "http://") + "/health", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):  # the self-signed certificate is not trusted by default
        requests.get(auth_server.url + "/health", timeout=10)


def test_secrets_are_not_in_the_users_file_or_the_log(auth_server):
    users_text = (auth_server.running.log.parent / "users.json").read_text()
    log_text = auth_server.running.log.read_text(errors="replace")
    for token in auth_server.tokens.values():
        secret = token.split(".")[-1]
        assert secret not in users_text and secret not in log_text


def test_revoking_takes_effect_without_a_restart(auth_server):
    users = UserStore(auth_server.running.log.parent / "users.json")
    token = users.add("temp-user", "annotator")
    assert auth_server.request("GET", "/info/", token).status_code == 200
    time.sleep(0.05)  # a distinct mtime for the re-read
    users.revoke("temp-user")
    assert auth_server.request("GET", "/info/", token).status_code == 401


# -- the Slicer extension's client against the same server ---------------------------------------------------------


@pytest.fixture(scope="module")
def lib():
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import FetalBrainSegLib.client as client
    import FetalBrainSegLib.errors as errors

    return client, errors


def _slicer_client(lib, server: AuthServer, token: str | None):
    client, _ = lib
    context = ssl.create_default_context(cafile=str(server.cert))
    return client.MonaiLabelClient(server.url, token, ssl_context=context)


def test_slicer_client_without_a_token_says_to_enter_one(lib, auth_server):
    _, errors = lib
    with pytest.raises(errors.TokenRejectedError, match="did not accept your access token") as info:
        _slicer_client(lib, auth_server, None).info()
    assert info.value.status == 401 and "Bearer" in info.value.server_message
    assert errors.is_retryable(info.value)  # a correction is kept in the outbox until the user signs in


@pytest.mark.parametrize("which", ["expired", "revoked", "forged"])
def test_slicer_client_with_a_bad_token_says_so(lib, auth_server, which):
    _, errors = lib
    token = _forged(auth_server)["wrong secret for a real id"] if which == "forged" else auth_server.tokens[which]
    with pytest.raises(errors.TokenRejectedError, match="missing, invalid or expired") as info:
        _slicer_client(lib, auth_server, token).next_sample("random")
    if which == "expired":
        assert "ask the site admin for a new one" in str(info.value)
    assert token.split(".")[-1] not in str(info.value) and token.split(".")[-1] not in repr(
        _slicer_client(lib, auth_server, token)
    )


def test_slicer_client_annotator_may_annotate_but_not_train(lib, auth_server):
    _, errors = lib
    client = _slicer_client(lib, auth_server, auth_server.tokens["annotator"])
    info = client.info()
    assert MODEL in info["models"]
    with pytest.raises(errors.PermissionDeniedError, match=r"not allowed to .*Ask the site administrator") as info_:
        client.start_training(MODEL, {"max_epochs": 1})
    assert info_.value.status == 403
    with pytest.raises(errors.PermissionDeniedError):
        client.training_status()
    saved = client.save_label("case02", auth_server.files["label"], tag="slicer")  # case02's own grid
    assert saved["image"] == "case02" and saved["tag"] == "slicer"


def test_slicer_client_trainer_reaches_training(lib, auth_server):
    _, errors = lib
    client = _slicer_client(lib, auth_server, auth_server.tokens["trainer"])
    client.training_status()  # answered (None = no run yet), no auth error
    with pytest.raises(errors.RequestRejectedError) as info:  # past auth: the trainer checks the parameters
        client.start_training(MODEL, {"max_epochs": -1})
    assert info.value.status == 400


# -- the MONAI Label audit log: who saved which label, who started which training, on which model --------------------


def _audit_rows(server: AuthServer) -> list[dict[str, Any]]:
    path = server.running.log.parent / "audit.jsonl"  # the launcher's default for a test server
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_audit_log_names_the_user_of_each_saved_label(auth_server):
    response = _call(auth_server, ("PUT", "/datastore/label"), auth_server.tokens["annotator"])
    assert response.status_code == 200, response.text
    saved = [r for r in _audit_rows(auth_server) if r["event"] == "label_saved" and r["user"] == "annotator-user"]
    assert saved and saved[-1]["image"] == "case02" and saved[-1]["tag"] == "final"
    assert saved[-1]["role"] == "annotator" and len(saved[-1]["upload_sha256"]) == 64
    assert saved[-1]["model"]["bundle_version"]
    log_text = (auth_server.running.log.parent / "audit.jsonl").read_text()
    assert all(token.split(".")[-1] not in log_text for token in auth_server.tokens.values())


def test_audit_log_names_who_started_training_and_from_which_model(auth_server):
    response = auth_server.request("POST", f"/train/{MODEL}", auth_server.tokens["trainer"], json={"max_epochs": 1})
    try:
        assert response.status_code == 200, response.text
    finally:
        auth_server.request("DELETE", "/train/", auth_server.tokens["trainer"])  # stop it: only the record matters
    (started,) = [r for r in _audit_rows(auth_server) if r["event"] == "train_requested"]
    assert started["user"] == "trainer-user" and started["task"] == MODEL
    assert started["params"] == {"max_epochs": 1} and "bundle_version" in started["model"]
