"""Client-level DP (the ``client_dp`` filter) in whole jobs: the NVFlare simulator and POC mode.

Every site clips its update to ``clip_norm`` and adds N(0, (σ·C)²) to each weight. The noise has norm ≈ σ·C·√d
(d ≈ 606,000 weights here), far above the server's default ``max_update_norm`` of 1000 at σ·C = 2: the job's
update guard must expect it, or every update is rejected and the job fails. Checked: the server accepts updates
of the noise's norm, the global model moves by the noise the weighted average of the sites' updates predicts (a
filter that did not run moves it ~500× less), each update that left a site says which filter ran with which ε
(the site's audit trail keeps the metadata as sent), and each site's ledger was charged that ε.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nvflare_jobs.config import ENV_PRIVACY_LEDGER, ENV_SITE_STATE
from nvflare_jobs.deploy import SITES_DIR, PocFederation, running
from nvflare_jobs.fetal_brain.job import export_job, run_simulation
from nvflare_jobs.fetal_brain.model import FetalBrainNet
from privacy.filters import ClientDPConfig
from privacy.ledger import SiteLedger
from tests.nvflare_jobs.conftest import SITES, TINY_OVERRIDES

CLIP, SIGMA, DELTA = 1.0, 2.0, 1e-5
DP_FILTER = {"type": "client_dp", "clip_norm": CLIP, "noise_multiplier": SIGMA, "delta": DELTA}
DP = ClientDPConfig(clip_norm=CLIP, noise_multiplier=SIGMA, delta=DELTA)
TOLERANCE = 0.03  # relative; the norm of 605,808 Gaussian values varies by ~0.1 %, the clipped signal by < 0.2 %


def _initial_model() -> dict[str, np.ndarray]:
    net = FetalBrainNet(TINY_OVERRIDES, init_seed=0)  # the tiny config's runtime.init_seed; keys as the server's
    return {k: v.numpy().astype(np.float64) for k, v in net.state_dict().items()}


def _num_weights() -> int:
    return sum(v.size for v in _initial_model().values())


def _dp_config(make_config, name: str, rounds: int) -> dict[str, Any]:
    return make_config(
        name=name,
        num_rounds=rounds,
        cross_site_eval=False,
        tracking=None,
        privacy={"filters": [DP_FILTER], "dp_sgd": None},
    )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_server_received_noise(server_log: str, rounds: int) -> None:
    """Every update the server saw was accepted, each with the norm of the noise (σ·C·√d), in every round."""
    assert "REJECTED" not in server_log
    accepted = re.findall(r"update from (site-\d) \(round (\d+)\) accepted: L2 norm ([\d.e+]+)", server_log)
    assert {int(r) for _, r, _ in accepted} == set(range(rounds)) and len(accepted) >= 2 * rounds
    expected = SIGMA * CLIP * math.sqrt(_num_weights())
    for site, rnd, norm in accepted:
        assert float(norm) == pytest.approx(expected, rel=TOLERANCE), (site, rnd)


def check_global_model_moved_by_the_noise(final_model: Path, round_metrics: Path) -> None:
    """The global model moved from its start by the noise of the weighted mean of the noised updates, per round:
    per weight, std σ·C·√(Σ_rounds Σ_i w_i² / (Σ_i w_i)²); the clipped signal (≤ C per round) is negligible."""
    final = torch.load(final_model, weights_only=False)["model"]
    start = _initial_model()
    change = np.concatenate([(np.asarray(final[k], np.float64) - v).ravel() for k, v in start.items()])
    variance = 0.0
    for row in _jsonl(round_metrics):
        weights = np.array([s["weight"] for s in row["sites"]], float)
        assert len(weights) >= 2
        variance += (SIGMA * CLIP) ** 2 * float(np.sum(weights**2) / np.sum(weights) ** 2)
    assert float(np.sqrt(np.mean(change**2))) == pytest.approx(math.sqrt(variance), rel=TOLERANCE)


def check_site_updates(site: str, job_id: str, *, site_log: str, audit: Path, state: Path, ledger: SiteLedger) -> int:
    """What left ``site`` was noised by the client-DP filter, says so with its ε, and was charged to the ledger.

    Returns the number of updates the site sent."""
    sent = [r for r in _jsonl(audit) if r["job"] == job_id and r["site"] == site]
    assert sent, site
    for n, record in enumerate(sent, start=1):
        # the metadata of the update as it left the site; the client-DP noise is the last thing done to it (a
        # site's own scope filters, e.g. site-3's percentile sharing, run before the job's)
        report = record["filter_reports"][-1]
        details = report["details"]
        assert report["filter"] == "client_dp" and details["dp"] is True and details["rounds"] == n
        assert details["epsilon"] == pytest.approx(DP.epsilon(n)) and record["epsilon"] == details["epsilon"]
        assert details["delta"] == DELTA and details["noise_std"] == SIGMA * CLIP and details["norm_clipped"] <= CLIP
        assert report["norm_after"] == pytest.approx(SIGMA * CLIP * math.sqrt(_num_weights()), rel=TOLERANCE)
        assert details["ledger"] == {
            "dataset_id": f"{site}/{site}",
            "job_id": f"{job_id}/client_dp",
            "epsilon": pytest.approx(DP.epsilon_any_change(n)),
        }
    assert f"'epsilon': {sent[-1]['epsilon']!r}" in site_log and "client_dp: kept 100.00%" in site_log
    assert json.loads(state.read_text())["rounds"] == len(sent)
    ledger.reload()
    spends = [
        r for r in ledger.records if r["type"] == "spend" and r["job_id"] == f"{job_id}/client_dp"
        and r["dataset_id"] == f"{site}/{site}"
    ]  # fmt: skip
    assert [r["epsilon"] for r in spends] == [pytest.approx(DP.epsilon_any_change(n)) for n in range(1, len(sent) + 1)]
    assert all(r["delta"] == DELTA and r["accountant"] == DP.accountant and "contribution" in r["unit"] for r in spends)
    return len(sent)


# -- the server's guard expects the noise ------------------------------------------------------------------------


def _guard_max_norm(job: Path) -> float:
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    filters = [f for entry in server["task_result_filters"] for f in entry["filters"]]
    (guard,) = [f for f in filters if f["path"].endswith("UpdateGuard")]
    return float(guard["args"].get("max_norm", 1000.0))  # the exporter leaves a default value out


def test_the_update_guard_admits_the_noise_of_a_client_dp_job(tmp_path: Path, make_config) -> None:
    plain = make_config(name="plain")
    assert _guard_max_norm(export_job(plain, tmp_path / "plain")) == 1000.0
    dp_job = export_job(_dp_config(make_config, "with_dp", 2), tmp_path / "dp")
    noise_norm = SIGMA * CLIP * math.sqrt(_num_weights())
    assert noise_norm > 1000.0  # the configured limit would reject every update
    assert noise_norm + CLIP < _guard_max_norm(dp_job) < 1.05 * noise_norm  # and a corrupt update is still caught


# -- the simulator -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, make_config, fl_env: dict) -> Iterator[tuple[Path, Path, SiteLedger]]:
    root = tmp_path_factory.mktemp("client_dp_sim")
    ledger = SiteLedger.init(root / "ledger.jsonl", epsilon_budget=1e6, delta_budget=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
        mp.setenv(ENV_SITE_STATE, str(root / "state"))
        run = run_simulation(_dp_config(make_config, "client_dp_sim", 2), root / "sim")
    yield run, root / "state", ledger


@pytest.mark.timeout(300)
@pytest.mark.slow
@pytest.mark.integration
def test_simulator_job_aggregates_noised_updates(sim: tuple[Path, Path, SiteLedger]) -> None:
    run, _, _ = sim
    job = run / "server" / "simulate_job"
    check_server_received_noise((run / "server" / "log.txt").read_text(), rounds=2)
    check_global_model_moved_by_the_noise(
        job / "app_server" / "FL_global_model.pt", job / "metrics" / "round_metrics.jsonl"
    )


@pytest.mark.timeout(300)
@pytest.mark.slow
@pytest.mark.integration
def test_simulator_sites_report_their_epsilon_and_charge_their_ledger(sim: tuple[Path, Path, SiteLedger]) -> None:
    run, state, ledger = sim
    rows = _jsonl(run / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl")
    aggregated = {s["name"] for row in rows for s in row["sites"]}
    assert len(aggregated) >= 2  # min_clients; normally all three
    for site in sorted(aggregated):
        sent = check_site_updates(
            site,
            "simulate_job",
            site_log=(run / site / "log.txt").read_text(),
            audit=run / site / "audit" / "updates.jsonl",
            state=state / f"client_dp_{site}_simulate_job.json",
            ledger=ledger,
        )
        assert sent == sum(site in {s["name"] for s in row["sites"]} for row in rows)


# -- POC mode --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poc_run(
    tmp_path_factory: pytest.TempPathFactory, federation: Path, make_config, fl_env: dict
) -> Iterator[tuple[PocFederation, str, str, SiteLedger]]:
    root = tmp_path_factory.mktemp("client_dp_poc")
    ledger = SiteLedger.init(root / "ledger.jsonl", epsilon_budget=1e6, delta_budget=0.5)
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation), ENV_PRIVACY_LEDGER: str(ledger.path)}
    # the demo sites' own policies: site-3's default scope adds percentile sharing before the job's filters
    policies = {site: SITES_DIR / site / "privacy.json" for site in SITES}
    fed = PocFederation(root / "poc", sites=SITES, env=env, site_policies=policies)
    with running(fed) as poc:
        job_id = poc.submit(export_job(_dp_config(make_config, "poc_client_dp", 1), poc.workspace / "jobs"))
        status = poc.wait(job_id, timeout=400)
        yield poc, job_id, status, ledger
    assert fed.processes() == [], "processes of the POC system survived poc stop"


@pytest.mark.timeout(600)
@pytest.mark.slow
@pytest.mark.integration
def test_poc_job_with_client_dp_completes_with_noised_updates(
    poc_run: tuple[PocFederation, str, str, SiteLedger],
) -> None:
    poc, job_id, status, ledger = poc_run
    assert status == "FINISHED:COMPLETED"
    result = poc.download(job_id, poc.workspace / "download")  # the server's job workspace, with its log
    (final,) = result.rglob("FL_global_model.pt")
    server_dir = final.parent.parent
    check_server_received_noise((server_dir / "log.txt").read_text(), rounds=1)
    metrics = server_dir / "metrics" / "round_metrics.jsonl"
    check_global_model_moved_by_the_noise(final, metrics)
    for site in {s["name"] for row in _jsonl(metrics) for s in row["sites"]}:
        site_dir = poc.site_job_dir(site, job_id)
        sent = check_site_updates(
            site,
            job_id,
            site_log=(site_dir / "log.txt").read_text(),
            audit=poc.kit(site) / "audit" / "updates.jsonl",
            state=site_dir / f"app_{site}" / "privacy_state" / f"client_dp_{site}_{job_id}.json",
            ledger=ledger,
        )
        assert sent == 1
