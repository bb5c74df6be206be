"""Faults in a real simulator run: poisoned updates are rejected, a dying site is left behind, and the job stops
when fewer than ``min_clients`` valid updates remain.

One run, four rounds, two deliberately broken sites (``faulty_client.py`` wraps the production client):

* round 0: site-3 sends an update with a NaN        -> rejected by the server, round goes on with 2 sites
* round 1: site-3 sends an update with norm ~1e7    -> rejected, round goes on with 2 sites
* round 2: site-2's process is killed mid-round     -> round goes on with site-1 and site-3
* round 3: site-3 sends NaN again, site-2 is gone   -> 1 valid update < min_clients=2: the job stops
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

FAULTY = Path(__file__).with_name("faulty_client.py")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory, make_config, fl_env: dict) -> tuple[Path, Exception | None]:
    from nvflare_jobs.fetal_brain.job import run_simulation

    workspace = tmp_path_factory.mktemp("faults")
    config = make_config(num_rounds=4, min_clients=2, cross_site_eval=False)

    def broken(faults: str) -> dict:
        return {"train_script": str(FAULTY), "train_args": f"--fault {faults} --config fetal_fl_job.json"}

    per_site = {"site-2": broken("die@2"), "site-3": broken("nan@0,norm@1,nan@3")}
    try:
        run_simulation(config, workspace, per_site_config=per_site)
        error = None
    except RuntimeError as e:
        error = e
    return workspace / config["name"], error


def _server_log(run: Path) -> str:
    return (run / "server" / "log.txt").read_text()


def test_poisoned_updates_are_rejected_with_a_log_line(faulty_run) -> None:
    log = _server_log(faulty_run[0])
    rejected = re.findall(r"REJECTED update from (site-\d) \(round (\d)\): ([^;]+);", log)
    assert [(s, r) for s, r, _ in rejected] == [("site-3", "0"), ("site-3", "1"), ("site-3", "3")]
    assert "non-finite" in rejected[0][2] and "exceeds max_update_norm" in rejected[1][2]


def test_rounds_go_on_without_the_failed_site_and_say_so(faulty_run) -> None:
    log = _server_log(faulty_run[0])
    continuing = re.findall(
        r"round (\d): continuing with 2 of 3 sites \[([^\]]*)\]; no valid update from \[([^\]]*)\]", log
    )
    assert continuing == [
        ("0", "'site-1', 'site-2'", "'site-3'"),
        ("1", "'site-1', 'site-2'", "'site-3'"),
        ("2", "'site-1', 'site-3'", "'site-2'"),
    ]


def test_the_job_stops_when_fewer_than_min_clients_remain(faulty_run) -> None:
    run, error = faulty_run
    log = _server_log(run)
    # site-1's valid update may arrive before or after the round is closed on the two failures: 0 or 1 valid
    assert re.search(r"round 3: only [01] valid update\(s\) \[('site-1')?\], fewer than min_clients=2", log)
    assert "stopping the job" in log and "Cannot reach min_responses" not in log  # our reason, not a panic race
    assert "Round 3 started" in log and "Round 4 started" not in log
    assert isinstance(error, RuntimeError)  # the simulator reports the job as failed


def test_nothing_non_finite_ever_reached_the_global_model(faulty_run) -> None:
    app = faulty_run[0] / "server" / "simulate_job" / "app_server"
    kept = torch.load(app / "FL_global_model.pt", weights_only=False)["model"]
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in kept.values())
    updates = [torch.as_tensor(v).abs().max().item() for v in kept.values()]
    assert max(updates) < 100  # the 1e9-scaled update was never averaged in
    metrics = faulty_run[0] / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert len(rows) == 3  # rounds 0..2 were aggregated, round 3 was not
