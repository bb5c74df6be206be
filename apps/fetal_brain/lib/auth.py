"""Bearer-token authentication and roles for the site's MONAI Label server, with no extra infrastructure.

Why our own: MONAI Label's built-in auth needs a Keycloak realm, and as packaged (0.8.5) decodes JWTs without
``algorithms=``, which rejects every token. A hospital server needs something an admin can run from one command.

* Tokens look like ``fbt.<token id>.<secret>``; the users file keeps only ``sha256(salt + secret)`` per token id
  (the secret is 256 random bits, so a fast hash with a per-token salt is enough: there is nothing to brute-force)
  and compares in constant time. The token is printed once, when it is created, and never logged.
* Each token has a user, a role and an expiry; revoking marks it revoked (the record stays for the audit trail).
* Roles are ordered: ``annotator`` < ``trainer`` < ``admin``. :func:`required_role` is the one table saying which
  role each route needs; :data:`PUBLIC` routes (the health check) need none.
* The server re-reads the file when it changes, so ``fetal-fl app user revoke`` takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalseg.plumbing import atomic_write_json
from fetalseg.settings import UsersSettings, env_names

ROLES = ("annotator", "trainer", "admin")
TOKEN_PREFIX = "fbt"
DEFAULT_USERS_FILE = Path("~/.fetal-fl/app_users.json")
# the app's ``users_file`` setting as an environment variable (``apps.fetal_brain.lib.config.ENV_PREFIX`` + key)
# the old name, which ``fetal-fl app user`` read and the server did not: still honoured, with a deprecation warning
USERS_FILE_ENV, DEPRECATED_USERS_FILE_ENV = env_names(UsersSettings, "users_file")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
HEALTH_PATH = "/health"
PUBLIC = {("GET", HEALTH_PATH), ("HEAD", HEALTH_PATH)}

log = logging.getLogger(__name__)

# (method, path prefix, role): first match wins; a route in none of these needs ``admin``
ROUTE_ROLES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/info/", "annotator"),
    ("POST", "/infer/", "annotator"),
    ("POST", "/activelearning/", "annotator"),
    ("PUT", "/datastore/label", "annotator"),  # submit a corrected label (not /datastore/label/info: below)
    ("GET", "/datastore/", "annotator"),  # list cases, download an image or a label
    ("HEAD", "/datastore/", "annotator"),
    ("GET", "/docs", "annotator"),
    ("GET", "/openapi.json", "annotator"),
    ("GET", "/favicon.ico", "annotator"),
    ("GET", "/train/", "trainer"),
    ("POST", "/train/", "trainer"),
    ("DELETE", "/train/", "trainer"),
    ("PUT", "/datastore/", "trainer"),  # add images, edit image/label info
    ("DELETE", "/datastore/", "trainer"),
    ("GET", "/model/", "trainer"),  # the model weights
    ("GET", "/logs/", "trainer"),
)


class AuthError(Exception):
    """A request without a valid token (401) or whose role may not do this (403); the message is safe to show."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's user, role and id (never the secret)."""

    user: str
    role: str
    token_id: str

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def required_role(method: str, path: str) -> str | None:
    """The least role a request needs; None for public routes (health check, CORS pre-flight)."""
    if (method, path) in PUBLIC or method == "OPTIONS":
        return None
    if method == "PUT" and path.startswith("/datastore/label/info"):
        return "trainer"
    if method == "GET" and path == "/":
        return "annotator"
    for m, prefix, role in ROUTE_ROLES:
        if method == m and (path == prefix or path.startswith(prefix) or path == prefix.rstrip("/")):
            return role
    return "admin"


def users_file(value: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> Path:
    """The users/tokens file, the one answer for the server and ``fetal-fl app user ...``.

    ``value`` (``--conf users_file`` / ``--users-file``), else ``$FETAL_BRAIN_USERS_FILE`` (the app's setting, as
    every other ``FETAL_BRAIN_<KEY>``), else the deprecated ``$FETAL_FL_USERS_FILE`` (with a warning), else
    ``~/.fetal-fl/app_users.json`` (:class:`fetalseg.settings.UsersSettings`). ``env`` defaults to ``os.environ``.
    """
    text = str(value) if value else UsersSettings.load(env).users_file
    return Path(text or DEFAULT_USERS_FILE).expanduser().resolve()


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


class UserStore:
    """The users/tokens file (JSON, mode 0600, written atomically)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._cache: tuple[float, int, dict[str, Any]] | None = None

    # -- file -----------------------------------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """All token records by id ({} if the file does not exist yet); re-read only when the file changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        with self._lock:
            if self._cache and self._cache[:2] == (stat.st_mtime, stat.st_size):
                return self._cache[2]
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"users file {self.path} is not valid JSON ({exc})") from exc
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if not isinstance(tokens, dict):
                raise ValueError(f"users file {self.path} has no 'tokens' object")
            self._cache = (stat.st_mtime, stat.st_size, tokens)
            return tokens

    def _save(self, tokens: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.path, {"version": 1, "tokens": tokens}, indent=2, sort_keys=True, perm=0o600)
        self._cache = None

    # -- admin ----------------------------------------------------------------------------------------------------
    def add(self, user: str, role: str, *, days: float | None = 90.0, expires_at: float | None = None) -> str:
        """Create a token for ``user`` with ``role``; return the token (shown once, stored only hashed)."""
        if not USER_RE.match(user or ""):
            raise ValueError(f"user name {user!r} must be 1-64 letters, digits or . _ @ - (starting with one)")
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        now = time.time()
        if expires_at is None and days is not None:
            if days <= 0:
                raise ValueError(f"days must be positive, got {days}")
            expires_at = now + days * 86400
        tokens = dict(self.load())
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        tokens[token_id] = {
            "user": user,
            "role": role,
            "salt": salt,
            "sha256": _hash(salt, secret),
            "created": now,
            "expires": expires_at,
            "revoked": None,
        }
        self._save(tokens)
        return f"{TOKEN_PREFIX}.{token_id}.{secret}"

    def list(self) -> list[dict[str, Any]]:
        """Token records without salt or hash, oldest first."""
        rows = []
        for token_id, rec in self.load().items():
            row = {k: v for k, v in rec.items() if k not in ("salt", "sha256")}
            row["token_id"] = token_id
            row["active"] = rec.get("revoked") is None and not _expired(rec)
            rows.append(row)
        return sorted(rows, key=lambda r: r.get("created") or 0)

    def revoke(self, who: str) -> list[str]:
        """Revoke the token with id ``who``, or every token of user ``who``; return the revoked token ids."""
        tokens = {k: dict(v) for k, v in self.load().items()}
        hits = [k for k, v in tokens.items() if (k == who or v.get("user") == who) and v.get("revoked") is None]
        if not hits:
            raise ValueError(f"no active token with id or user {who!r} in {self.path}")
        for k in hits:
            tokens[k]["revoked"] = time.time()
        self._save(tokens)
        return hits

    # -- requests -------------------------------------------------------------------------------------------------
    def authenticate(self, header: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; :class:`AuthError` (401) if missing/invalid."""
        if not header:
            raise AuthError("authentication required: send 'Authorization: Bearer <token>'", status=401)
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("authentication required: send 'Authorization: Bearer <token>'", status=401)
        parts = token.strip().split(".")
        invalid = AuthError("invalid token (unknown, revoked or forged)", status=401)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise invalid
        _, token_id, secret = parts
        rec = self.load().get(token_id)
        if not isinstance(rec, dict):
            _hash("00" * 16, secret)  # same work as a known id: no timing hint which ids exist
            raise invalid
        try:
            digest = _hash(str(rec.get("salt", "")), secret)
        except ValueError:  # a corrupt salt in the file
            raise invalid from None
        if not hmac.compare_digest(digest, str(rec.get("sha256", ""))):
            raise invalid
        if rec.get("revoked") is not None:
            raise invalid
        if _expired(rec):
            raise AuthError("token expired: ask the site admin for a new one", status=401)
        role = rec.get("role")
        if role not in ROLES:
            raise invalid
        return Principal(user=str(rec.get("user")), role=str(role), token_id=token_id)

    def authorize(self, header: str | None, method: str, path: str) -> Principal | None:
        """The principal allowed to make this request (None for public routes); AuthError 401/403 otherwise."""
        need = required_role(method, path)
        if need is None:
            return None
        principal = self.authenticate(header)
        if not principal.may(need):
            raise AuthError(f"role {principal.role!r} may not {method} {path} (needs {need})", status=403)
        return principal


def _expired(rec: dict[str, Any]) -> bool:
    expires = rec.get("expires")
    return expires is not None and time.time() >= float(expires)
