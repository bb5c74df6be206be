"""The statistics job on a real local POC system (`fetal-fl fl stats run --poc`): NVFlare's server and three site
clients on 127.0.0.1 with the demo site policies, so each site's ``statistics`` scope (``LimitStatistics``) checks
the request before anything is computed, and each site charges its ledger exactly the planned ε."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetal_fl.cli import main
from nvflare_jobs.statistics.config import load_stats_config

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]


def test_statistics_job_on_a_poc_system(tmp_path: Path, federation: Path, fl_env: dict, capsys) -> None:
    from privacy.ledger import SiteLedger

    planned = load_stats_config().request.planned_epsilon
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=planned * 3, delta_budget=1e-3)
    argv = ["fl", "stats", "run", "--poc", "--workspace", str(tmp_path / "ws"), "--data-root", str(federation)]
    code = main([*argv, "--ledger", str(ledger.path)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out[out.rindex("{\n") :])
    assert summary["status"] == "FINISHED:COMPLETED" and Path(summary["result"]).is_file()
    assert all(f"| {site} |" in out for site in SITES)  # the table: one row per site

    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "ws" / "poc_run").rglob("log.txt"))
    assert logs.count("site privacy policy: statistics request fits") >= len(SITES)  # each site's scope ran
    ledger.reload()
    for site in SITES:
        dataset = f"{site}/{site}"
        assert ledger.spent(dataset).epsilon == pytest.approx(planned), site  # charged once, at the plan
        assert ledger.reservations(dataset) == []
