"""A site's DP-SGD policy in NVFlare's simulator: a job planning more ε than the site allows is refused at its
first task, before the site trains a single step or spends any ε; the other sites carry the job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvflare_jobs.config import ENV_PRIVACY_LEDGER, ENV_SITE_STATE, JobConfig
from nvflare_jobs.fetal_brain.job import run_simulation
from nvflare_jobs.plan import site_privacy_plan

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "grad_sample_mode": "hooks"}
POLICY = "nvflare_jobs.site_policy.RequireDPSGD"


def test_a_job_planning_too_much_epsilon_is_refused_before_any_training(
    tmp_path: Path, make_config, fl_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from privacy.ledger import SiteLedger

    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=1.0e6, delta_budget=0.5)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    monkeypatch.setenv(ENV_SITE_STATE, str(tmp_path / "state"))
    base = make_config(name="policy_refusal", num_rounds=1, cross_site_eval=False, tracking=None)
    base["privacy"] = {"dp_sgd": DP, "filters": []}
    planned = site_privacy_plan(JobConfig.from_dict(base), "site-2").epsilon
    limit = round(planned / 2, 3)  # site-2's policy allows half of what the job plans; the others allow it all
    base["privacy"]["sites"] = {
        "site-2": {"filters": [{"type": "class", "path": POLICY, "args": {"max_epsilon": limit}}]}
    }
    for site in ("site-1", "site-3"):
        base["privacy"]["sites"][site] = {"filters": [{"type": "class", "path": POLICY, "args": {"max_epsilon": 1e3}}]}

    run = run_simulation(base, tmp_path / "sim")

    site2_log = (run / "site-2" / "log.txt").read_text()
    assert "refused" in site2_log and f"epsilon={planned:.4g}" in site2_log and f"max_epsilon={limit:.4g}" in site2_log
    assert "DP-SGD update allowed" not in site2_log  # no update was ever produced there
    for site in ("site-1", "site-3"):
        log = (run / site / "log.txt").read_text()
        assert "the job's DP-SGD plan fits" in log and "DP-SGD update allowed" in log, site
    # no DP-SGD step and no ε spent at the refusing site; the others trained and spent
    ledger.reload()
    assert ledger.spent("site-2/site-2").epsilon == 0.0
    assert ledger.spent("site-1/site-1").epsilon > 0 and ledger.spent("site-3/site-3").epsilon > 0
    state = {
        s: json.loads((tmp_path / "state" / f"dpsgd_{s}_simulate_job.json").read_text()) for s in ("site-1", "site-2")
    }
    assert state["site-2"]["history"] == [] and state["site-1"]["history"]
    # the round went ahead with the two other sites (min_clients=2)
    rows = (run / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    (round0,) = [json.loads(r) for r in rows if r.strip()]
    assert sorted(s["name"] for s in round0["sites"]) == ["site-1", "site-3"]
