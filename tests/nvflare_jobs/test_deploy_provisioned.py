"""Production-style deployment on loopback: `nvflare provision` of sites/project.yml (1 server, 3 hospitals,
1 admin), every participant started from its own startup kit with mutual TLS and its hospital's privacy.json, the
admin connected, and one job trained end to end over those connections (`nvflare job submit/wait/download`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvflare_jobs.deploy import LOOPBACK, SITES_DIR, ProvisionedFederation, running
from nvflare_jobs.fetal_brain.job import export_job

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory, federation: Path, fl_env: dict) -> Iterator[ProvisionedFederation]:
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation)}
    policies = {site: SITES_DIR / site / "privacy.json" for site in SITES}
    fed = ProvisionedFederation(tmp_path_factory.mktemp("prod"), sites=SITES, env=env, site_policies=policies)
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
    """The admin's kit logs in (certificate-authenticated) and the server reports the three connected sites."""
    status = prod.admin_json(["system", "status", "client"])
    assert status["status"] == "ok"
    text = json.dumps(status["data"])
    assert all(site in text for site in SITES), text
    jobs = prod.admin_json(["job", "list"])
    assert jobs["status"] == "ok"


def test_a_job_trains_over_the_provisioned_kits_under_the_sites_scope(
    prod: ProvisionedFederation, make_config, downloaded_job
) -> None:
    """A one-round job declaring the sites' ``percentile`` scope: every hospital trains, its own percentile filter
    (from its privacy.json; the job names none) runs on what leaves it, and the admin downloads the best model.
    (test_deploy_poc.py runs the ``dp_required`` scope and the refusal of an unknown scope.)"""
    config = make_config(name="prod_percentile", num_rounds=1, scope="percentile")
    job_id = prod.submit(export_job(config, prod.workspace / "jobs"))
    assert prod.wait(job_id, timeout=400) == "FINISHED:COMPLETED"
    for site in SITES:
        log = (prod.site_job_dir(site, job_id) / "log.txt").read_text()
        assert "percentile_share: kept" in log, site
    downloaded_job(prod.download(job_id, prod.workspace / "download"), job_id, rounds=1)
