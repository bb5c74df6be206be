"""Production-style deployment on loopback: `nvflare provision` of sites/project.yml (1 server, 3 hospitals,
1 admin), every participant started from its own startup kit with mutual TLS, the admin connected."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvflare_jobs.deploy import LOOPBACK, ProvisionedFederation, running

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory, federation: Path, fl_env: dict) -> Iterator[ProvisionedFederation]:
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation)}
    fed = ProvisionedFederation(tmp_path_factory.mktemp("prod"), sites=SITES, env=env)
    with running(fed) as started:
        yield started
    assert fed.processes() == [], "processes of the provisioned system survived the shutdown"


def test_each_participant_has_its_own_kit_with_mutual_tls(prod: ProvisionedFederation) -> None:
    server = json.loads((prod.kit("localhost") / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["service"]["target"] == f"localhost:{prod.fed_port}" and server["connection_security"] == "mtls"
    for site in SITES:
        startup = prod.kit(site) / "startup"
        client = json.loads((startup / "fed_client.json").read_text())
        assert client["client"]["connection_security"] == "mtls" and client["client"]["fqsn"] == site
        assert {"client.crt", "client.key", "rootCA.pem"} <= {p.name for p in startup.iterdir()}
    assert (prod.admin_kit / "startup" / "client.crt").is_file()


def test_every_listener_is_bound_to_loopback(prod: ProvisionedFederation) -> None:
    listeners = prod.listeners()
    assert any(listener.port == prod.fed_port for listener in listeners)
    assert any(listener.port == prod.admin_port for listener in listeners)
    assert [vars(x) for x in listeners if x.address != LOOPBACK] == []


def test_the_admin_sees_every_hospital_over_mutual_tls(prod: ProvisionedFederation) -> None:
    """The admin's kit logs in (certificate-authenticated) and the server reports the three connected sites.

    A full job in this mode runs the same client and kits as the POC test (test_deploy_poc.py), so it is not
    repeated here to keep the suite short."""
    status = prod.admin_json(["system", "status", "client"])
    assert status["status"] == "ok"
    text = json.dumps(status["data"])
    assert all(site in text for site in SITES), text
    jobs = prod.admin_json(["job", "list"])
    assert jobs["status"] == "ok"
