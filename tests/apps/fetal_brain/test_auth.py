"""Token store, role table, start-up exposure check and ``fetal-fl app user ...`` (no server; see
``tests/security/test_auth_server.py`` for the real server)."""

from __future__ import annotations

import argparse
import json
import stat
import time

import pytest

from apps.fetal_brain.cli import register
from apps.fetal_brain.lib.auth import AuthError, UserStore, required_role
from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.server import bound_host, check_exposure


@pytest.fixture
def store(tmp_path) -> UserStore:
    return UserStore(tmp_path / "users.json")


def test_tokens_are_stored_hashed_with_salt_and_private(store):
    token = store.add("alice", "annotator")
    text = store.path.read_text()
    secret = token.split(".")[-1]
    assert secret not in text and token not in text
    record = next(iter(json.loads(text)["tokens"].values()))
    assert set(record) >= {"salt", "sha256", "user", "role", "expires"} and record["user"] == "alice"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.authenticate(f"Bearer {token}").user == "alice"
    other = store.add("alice", "annotator")
    assert other != token  # every token is new, even for the same user


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic YWxpY2U6eA==", "Bearer fbt.x", "Bearer fbt.000000000000.abc", "Bearer a.b.c"],
)
def test_missing_or_malformed_tokens_are_401(store, header):
    store.add("alice", "admin")
    with pytest.raises(AuthError) as info:
        store.authenticate(header)
    assert info.value.status == 401


def test_a_forged_secret_for_a_real_id_is_401(store):
    token = store.add("alice", "admin")
    prefix, token_id, secret = token.split(".")
    with pytest.raises(AuthError, match="invalid token"):
        store.authenticate(f"Bearer {prefix}.{token_id}.{secret[:-1] + ('A' if secret[-1] != 'A' else 'B')}")


def test_expired_and_revoked_tokens_are_401(store):
    old = store.add("old", "admin", expires_at=time.time() - 1)
    with pytest.raises(AuthError, match="expired"):
        store.authenticate(f"Bearer {old}")
    token = store.add("bob", "trainer")
    assert store.revoke("bob") == [token.split(".")[1]]
    with pytest.raises(AuthError, match="invalid token"):
        store.authenticate(f"Bearer {token}")
    with pytest.raises(ValueError, match="no active token"):
        store.revoke("bob")
    rows = {r["user"]: r for r in store.list()}
    assert rows["bob"]["active"] is False and rows["old"]["active"] is False
    assert all("sha256" not in r and "salt" not in r for r in rows.values())


def test_roles_are_ordered(store):
    annotator = f"Bearer {store.add('ann', 'annotator')}"
    trainer = f"Bearer {store.add('tr', 'trainer')}"
    assert store.authorize(annotator, "POST", "/infer/fetal_brain_seg").role == "annotator"
    assert store.authorize(annotator, "PUT", "/datastore/label").user == "ann"
    with pytest.raises(AuthError) as info:
        store.authorize(annotator, "POST", "/train/fetal_brain_seg")
    assert info.value.status == 403
    assert store.authorize(trainer, "POST", "/train/fetal_brain_seg").role == "trainer"
    assert store.authorize(None, "GET", "/health") is None


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/health", None),
        ("OPTIONS", "/info/", None),
        ("GET", "/info/", "annotator"),
        ("PUT", "/datastore/label", "annotator"),
        ("PUT", "/datastore/label/info", "trainer"),
        ("PUT", "/datastore/image", "trainer"),
        ("GET", "/model/fetal_brain_seg", "trainer"),
        ("POST", "/somewhere/new", "admin"),  # an unlisted route needs the highest role
    ],
)
def test_required_role(method, path, role):
    assert required_role(method, path) == role


def test_bad_user_names_and_roles_are_refused(store):
    with pytest.raises(ValueError, match="user name"):
        store.add("../x", "annotator")
    with pytest.raises(ValueError, match="role"):
        store.add("alice", "root")


def test_a_corrupt_users_file_is_a_clear_error(store):
    store.path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        store.authenticate("Bearer fbt.a.b")


@pytest.mark.parametrize(
    ("conf", "host", "refused"),
    [
        ({}, "127.0.0.1", False),
        ({}, "0.0.0.0", True),
        ({}, "10.1.2.3", True),
        ({"allow_remote": "true"}, "127.0.0.1", True),
        ({"auth": "true"}, "0.0.0.0", False),
        ({"auth": "true", "allow_remote": "true"}, "0.0.0.0", False),
    ],
)
def test_auth_off_is_refused_unless_loopback(conf, host, refused):
    config = AppConfig.from_conf(conf, env={})
    if refused:
        with pytest.raises(RuntimeError, match="authentication is off"):
            check_exposure(config, host)
    else:
        check_exposure(config, host)


def test_bound_host_reads_the_start_server_command_line():
    assert bound_host(["x", "start_server", "--host", "10.0.0.1"]) == "10.0.0.1"
    assert bound_host(["x", "start_server"]) == "0.0.0.0"  # MONAI Label's default
    assert bound_host(["pytest"]) == "127.0.0.1"


def test_cors_origins_are_checked():
    assert AppConfig.from_conf({"cors_origins": "https://a.example, http://b:8080/"}, env={}).cors_origins == (
        "https://a.example",
        "http://b:8080",
    )
    with pytest.raises(ValueError, match="no '\\*'"):
        AppConfig.from_conf({"cors_origins": "*"}, env={})


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_user_add_prints_the_token_once_list_never(parser, capsys, tmp_path):
    users = str(tmp_path / "u.json")
    args = parser.parse_args(["app", "user", "add", "carol", "--role", "trainer", "--users-file", users])
    assert args.handler(args) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert UserStore(users).authenticate(f"Bearer {token}").role == "trainer"
    args = parser.parse_args(["app", "user", "list", "--users-file", users])
    assert args.handler(args) == 0
    listed = capsys.readouterr().out
    assert token.split(".")[-1] not in listed and json.loads(listed)[0]["user"] == "carol"
    args = parser.parse_args(["app", "user", "revoke", "carol", "--users-file", users])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == [token.split(".")[1]]


def test_cli_serve_refuses_a_public_address_without_auth(parser, tmp_path):
    args = parser.parse_args(["app", "serve", "--studies", str(tmp_path), "--host", "0.0.0.0", "--dryrun"])
    with pytest.raises(ValueError, match="without authentication"):
        args.handler(args)
    args = parser.parse_args(
        ["app", "serve", "--studies", str(tmp_path), "--host", "0.0.0.0", "--conf", "auth", "true", "--dryrun"]
    )
    assert args.handler(args) == 0


def test_cli_serve_tls_needs_both_files(parser, tmp_path, capsys):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    args = parser.parse_args(["app", "serve", "--studies", str(tmp_path), "--ssl-certfile", str(cert), "--dryrun"])
    with pytest.raises(ValueError, match="both"):
        args.handler(args)
    key = tmp_path / "k.pem"
    key.write_text("x")
    args = parser.parse_args(
        ["app", "serve", "--studies", str(tmp_path), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--dryrun"]
    )
    assert args.handler(args) == 0
    assert "--ssl_certfile" in capsys.readouterr().out
