"""One users file for the server and ``fetal-fl app user ...`` (issue 23: the CLI read ``$FETAL_FL_USERS_FILE``
while the server read ``$FETAL_BRAIN_USERS_FILE``, so an admin could write tokens to a file the server never read).

Both now resolve it with :func:`apps.fetal_brain.lib.auth.users_file`. The test drives the real ``fetal-fl`` entry
point and builds the server's ASGI object from the real :meth:`AppConfig.from_conf`, as ``create_app`` does.
"""

from __future__ import annotations

import warnings

import pytest

from apps.fetal_brain.lib import auth
from apps.fetal_brain.lib.auth import DEPRECATED_USERS_FILE_ENV, USERS_FILE_ENV, users_file
from apps.fetal_brain.lib.config import ENV_PREFIX, AppConfig
from apps.fetal_brain.server import FetalBrainServer, stock_app
from fetal_fl.cli import main as fetal_fl


def _add_user(capsys, *argv: str) -> str:
    assert fetal_fl(["app", "user", "add", "alice", "--role", "trainer", *argv]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith(auth.TOKEN_PREFIX + ".")
    return token


def _server_authorizes(token: str) -> auth.Principal:
    """What the server does at start-up: its settings from the environment, then its users file."""
    server = FetalBrainServer(stock_app, config=AppConfig.from_conf({"auth": "true"}))
    try:
        assert server.users is not None
        return server.users.authorize(f"Bearer {token}", "POST", "/train/")
    finally:
        server.infer_pool.shutdown(wait=False)


def test_the_variable_is_the_apps_own_setting():
    assert ENV_PREFIX + "USERS_FILE" == USERS_FILE_ENV


def test_user_add_with_the_servers_variable_writes_the_file_the_server_reads(tmp_path, monkeypatch, capsys):
    path = tmp_path / "site" / "users.json"
    monkeypatch.setenv(USERS_FILE_ENV, str(path))
    monkeypatch.delenv(DEPRECATED_USERS_FILE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default file must not be the one written
    token = _add_user(capsys)
    assert path.is_file()
    assert not (tmp_path / "home" / ".fetal-fl").exists()
    principal = _server_authorizes(token)
    assert (principal.user, principal.role) == ("alice", "trainer")


def test_the_old_variable_still_works_with_a_deprecation_warning(tmp_path, monkeypatch, capsys):
    path = tmp_path / "old.json"
    monkeypatch.delenv(USERS_FILE_ENV, raising=False)
    monkeypatch.setenv(DEPRECATED_USERS_FILE_ENV, str(path))
    with pytest.warns(DeprecationWarning, match=USERS_FILE_ENV):
        token = _add_user(capsys)
    assert path.is_file()
    with pytest.warns(DeprecationWarning):
        assert _server_authorizes(token).user == "alice"


def test_an_explicit_file_or_the_new_variable_wins_over_the_old_one(tmp_path):
    new, old, flag = tmp_path / "new.json", tmp_path / "old.json", tmp_path / "flag.json"
    env = {USERS_FILE_ENV: str(new), DEPRECATED_USERS_FILE_ENV: str(old)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning when the old name is not what is used
        assert users_file(env=env) == new
        assert users_file(flag, env=env) == flag
    assert users_file(env={}) == auth.DEFAULT_USERS_FILE.expanduser().resolve()
