"""POC mode for real: `nvflare poc prepare/start`, `job submit/wait/download`, `poc stop`, all on 127.0.0.1.

The three demo hospitals run with their own ``privacy.json``. The job declares the ``dp_required`` scope and
configures DP-SGD but no filter: each site's policy filters (DP-SGD check, fail-closed percentile sharing) run
anyway. A job naming a scope the sites do not define is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvflare_jobs.deploy import LOOPBACK, SITES_DIR, PocFederation, running
from nvflare_jobs.fetal_brain.job import export_job

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory, federation: Path, fl_env: dict) -> Iterator[PocFederation]:
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation)}
    policies = {site: SITES_DIR / site / "privacy.json" for site in SITES}
    fed = PocFederation(tmp_path_factory.mktemp("poc"), sites=SITES, env=env, site_policies=policies)
    with running(fed) as started:
        yield started
    assert fed.processes() == [], "processes of the POC system survived poc stop"


@pytest.fixture(scope="module")
def dp_job(poc: PocFederation, make_config) -> tuple[str, str]:
    config = make_config(name="poc_dp", num_rounds=1, scope="dp_required", privacy={"dp_sgd": DP, "filters": []})
    job_id = poc.submit(export_job(config, poc.workspace / "jobs"))
    return job_id, poc.wait(job_id, timeout=400)


def test_every_listener_is_bound_to_loopback(poc: PocFederation) -> None:
    listeners = poc.listeners()
    assert any(listener.port == poc.fed_port for listener in listeners)
    assert len({listener.pid for listener in listeners}) >= 4  # server and three clients
    assert [vars(x) for x in listeners if x.address != LOOPBACK] == []


def test_job_runs_under_each_sites_dp_policy(poc: PocFederation, dp_job: tuple[str, str]) -> None:
    job_id, status = dp_job
    assert status == "FINISHED:COMPLETED"
    for site in SITES:
        log = (poc.site_job_dir(site, job_id) / "log.txt").read_text()
        assert "site privacy policy: DP-SGD update allowed" in log, site  # RequireDPSGD (site scope) ran
        assert "percentile_share: kept" in log, site  # the site's percentile filter ran; the job named none
        state = poc.site_job_dir(site, job_id) / f"app_{site}" / "privacy_state" / f"dpsgd_{site}_{job_id}.json"
        assert json.loads(state.read_text())["history"], site  # the site's DP-SGD accountant took steps


def test_best_model_comes_back_with_the_job_download(
    poc: PocFederation, dp_job: tuple[str, str], downloaded_job
) -> None:
    job_id, _ = dp_job
    info = downloaded_job(poc.download(job_id, poc.workspace / "download"), job_id, rounds=1)
    # DP-SGD sites withhold their Dice (privacy/released_metrics.py): nothing to select on, the last round is kept
    assert info["selected_by"].startswith("last round") and info["val_mean_dice"] is None


def test_a_job_with_an_unknown_scope_is_refused_by_the_sites(poc: PocFederation, make_config) -> None:
    config = make_config(name="poc_unknown_scope", num_rounds=1, scope="no_such_scope")
    job_id = poc.submit(export_job(config, poc.workspace / "jobs"))
    assert poc.wait(job_id, timeout=120) == "FINISHED:FAILED_TO_RUN"
    log = (poc.kit(poc.server_name) / "log.txt").read_text()
    for site in SITES:
        assert f"{site}: NVFLARE_ERROR: privacy scope 'no_such_scope' is not allowed" in log
