"""Secure aggregation in NVFlare's simulator (tiny bundle, one round per run): the aggregate equals plain FedAvg of
the same updates, what the server receives from a site is unrelated to its update, a site that dies after its peers
masked is recovered, below the threshold the job stops with a message, and a site policy refuses a plain job."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.nvflare_jobs.conftest import SITES, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

FAULTY = Path(__file__).parents[1] / "faulty_client.py"
SECURE = {"secure_aggregation": {"enabled": True, "threshold": 2}}
FRAC = 2.0**-16


def broken(faults: str) -> dict:
    return {"train_script": str(FAULTY), "train_args": f"--fault {faults} --config fetal_fl_job.json"}


def run(tmp: Path, name: str, config: dict, per_site: dict | None = None, record: bool = False) -> Path:
    from nvflare.recipe import SimEnv

    from nvflare_jobs.fetal_brain.job import build_recipe
    from tests.nvflare_jobs.received import ReceivedRecorder

    recipe = build_recipe(config, per_site_config=per_site, command=f"{sys.executable} -u")
    if record:
        recorder = ReceivedRecorder(str(tmp / f"{name}_received" / "received.jsonl"), arrays=True)
        recipe.add_server_input_filter(recorder, tasks=["train"])
    with contextlib.suppress(RuntimeError):  # a job that stops: the tests read why from the logs
        recipe.run(SimEnv(clients=list(SITES), num_threads=len(SITES), workspace_root=str(tmp / name)))
    return tmp / name / config["name"]


def final_change(job: Path, overrides: dict) -> dict[str, np.ndarray]:
    import torch

    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    initial = {k: v.numpy() for k, v in FetalBrainNet(overrides, init_seed=0).state_dict().items()}
    final = torch.load(job / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", weights_only=False)
    return {k: np.asarray(v, dtype=np.float64) - initial[k] for k, v in final["model"].items()}


@pytest.fixture(scope="module")
def plain_and_secure(tmp_path_factory, federation: Path, fl_env: dict) -> dict:
    tmp = tmp_path_factory.mktemp("secagg")
    out = {"tmp": tmp}
    for name, server in (("plain", {}), ("secure", SECURE)):
        cfg = tiny_config(federation, name=f"sa_{name}", num_rounds=1, cross_site_eval=False, server=server)
        out[name] = run(tmp, name, cfg, record=True)
        out[f"{name}_cfg"] = cfg
    return out


def received(tmp: Path, name: str) -> dict[str, tuple[dict[str, np.ndarray], object]]:
    from tests.nvflare_jobs.received import read_received

    folder = tmp / f"{name}_received"
    meta = {r["site"]: r["meta"] for r in read_received(folder / "received.jsonl", updates_only=True)}
    return {s: (dict(np.load(folder / f"{s}_round0.npz")), meta[s].get("NUM_STEPS_CURRENT_ROUND")) for s in SITES}


def test_the_aggregate_equals_plain_fedavg(plain_and_secure: dict) -> None:
    tmp, overrides = plain_and_secure["tmp"], plain_and_secure["plain_cfg"]["bundle_overrides"]
    plain = received(tmp, "plain")
    steps = {s: plain[s][1] for s in SITES}
    assert all(isinstance(n, int) and n > 0 for n in steps.values())
    total = sum(steps.values())
    expected = {k: sum(steps[s] * plain[s][0][k].astype(np.float64) for s in SITES) / total for k in plain["site-1"][0]}
    plain_change = final_change(plain_and_secure["plain"], overrides)
    secure_change = final_change(plain_and_secure["secure"], overrides)
    assert max(float(np.max(np.abs(expected[k]))) for k in expected) > 1e-3  # a real update, not zeros
    for k in expected:
        np.testing.assert_allclose(plain_change[k], expected[k], rtol=0, atol=1e-5)  # float32 sums
        # fixed point (2^-17 per value and site) + float32 rounding; both runs train the same way (same seeds)
        np.testing.assert_allclose(secure_change[k], expected[k], rtol=0, atol=1e-4)
    log = (plain_and_secure["secure"] / "server" / "log.txt").read_text()
    assert "unmasked the sum of 3 masked updates" in log and "REJECTED" not in log


def test_what_the_server_receives_is_unrelated_to_the_update(plain_and_secure: dict) -> None:
    tmp = plain_and_secure["tmp"]
    plain, secure = received(tmp, "plain"), received(tmp, "secure")
    for s in SITES:
        masked, steps_sent = secure[s]
        assert steps_sent is None  # the site's step count (its data size) no longer reaches the server
        assert all(a.dtype == np.uint32 for a in masked.values())
        keys = sorted(plain[s][0])
        true = np.concatenate([plain[s][0][k].ravel().astype(np.float64) for k in keys]) * plain[s][1]
        seen = np.concatenate([masked[k].ravel().view(np.int32).astype(np.float64) * FRAC for k in keys])
        r = abs(np.corrcoef(seen, true)[0, 1])
        assert r < 0.02, (s, r)  # ~600,000 values: |r| of independent data ~0.001
        assert np.max(np.abs(seen)) > 1000 * np.max(np.abs(true))  # uniform over the whole range


def test_the_audit_trail_records_masked_payloads_and_the_aggregate(plain_and_secure: dict) -> None:
    from nvflare_jobs.audit import read_records

    job = plain_and_secure["secure"]
    server = read_records(job / "server" / "audit" / "received.jsonl")
    by_site = {r["site"]: r for r in server}
    assert "(aggregate)" in by_site and by_site["(aggregate)"]["survivors"] == SITES
    for s in SITES:
        (site_rec,) = read_records(job / s / "audit" / "updates.jsonl")
        assert site_rec["sha256"] == by_site[s]["sha256"]  # what left the site (masked) is what arrived


def test_a_site_that_dies_after_its_peers_masked_is_recovered(tmp_path: Path, make_config, fl_env: dict) -> None:
    cfg = make_config(name="sa_drop", num_rounds=1, min_clients=2, cross_site_eval=False, server=SECURE)
    job = run(tmp_path, "drop", cfg, per_site={"site-3": broken("die@0")})
    log = (job / "server" / "log.txt").read_text()
    assert "['site-3'] dropped after masking" in log
    assert "unmasked the sum of 2 masked updates ['site-1', 'site-2']" in log
    change = final_change(job, cfg["bundle_overrides"])
    assert all(np.all(np.isfinite(v)) for v in change.values()) and max(np.max(np.abs(v)) for v in change.values()) > 0


def test_below_the_threshold_the_job_stops_and_the_site_guard_refuses_nan(
    tmp_path: Path, make_config, fl_env: dict
) -> None:
    cfg = make_config(name="sa_few", num_rounds=1, min_clients=1, cross_site_eval=False, server=SECURE)
    job = run(tmp_path, "few", cfg, per_site={"site-2": broken("nan@0"), "site-3": broken("die@0")})
    log = (job / "server" / "log.txt").read_text()
    assert "below the secure-aggregation threshold 2" in log and "stopping the job" in log
    site2 = (job / "site-2" / "log.txt").read_text()
    assert "update NOT sent (site-side guard)" in site2 and "non-finite" in site2
    assert "unmasked the sum" not in log  # nothing was aggregated


def test_a_site_requiring_secure_aggregation_refuses_a_plain_job(tmp_path: Path, make_config, fl_env: dict) -> None:
    policy = {"type": "class", "path": "nvflare_jobs.site_policy.RequireSecureAggregation", "args": {}}
    cfg = make_config(name="sa_policy", num_rounds=1, min_clients=2, cross_site_eval=False)
    cfg["privacy"]["sites"] = {"site-2": {"filters": [policy]}}
    job = run(tmp_path, "policy", cfg)
    site2 = (job / "site-2" / "log.txt").read_text()
    assert "requires secure aggregation" in site2 and "refused before any training" in site2
    rows = (job / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    (round0,) = [json.loads(r) for r in rows if r.strip()]
    assert sorted(s["name"] for s in round0["sites"]) == ["site-1", "site-3"]


def test_a_tampered_key_table_stops_the_job_before_training(
    tmp_path: Path, make_config, fl_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nvflare_jobs.secure_aggregation.server as server_module
    from tests.nvflare_jobs.secure_aggregation.tampering_server import TamperingFedAvg

    monkeypatch.setattr(server_module, "SecureFetalFedAvg", TamperingFedAvg)  # the recipe builds this controller
    cfg = make_config(name="sa_tamper", num_rounds=1, cross_site_eval=False, server=SECURE)
    job = run(tmp_path, "tamper", cfg)
    site3 = (job / "site-3" / "log.txt").read_text()
    assert "different public key for this site" in site3 and "secure aggregation REFUSED" in site3
    log = (job / "server" / "log.txt").read_text()
    assert "['site-3'] did not complete key agreement; stopping the job" in log
    for s in SITES:  # no site trained, nothing was masked or sent
        assert "masked update sent" not in (job / s / "log.txt").read_text()


@pytest.mark.parametrize("algorithm", ["fedopt", "fedprox"])
def test_fedopt_and_fedprox_run_on_the_unmasked_sum(tmp_path: Path, make_config, fl_env: dict, algorithm: str) -> None:
    cfg = make_config(name=f"sa_{algorithm}", algorithm=algorithm, num_rounds=1, cross_site_eval=False, server=SECURE)
    job = run(tmp_path, algorithm, cfg)
    log = (job / "server" / "log.txt").read_text()
    assert "unmasked the sum of 3 masked updates" in log
    change = final_change(job, cfg["bundle_overrides"])
    assert all(np.all(np.isfinite(v)) for v in change.values()) and max(np.max(np.abs(v)) for v in change.values()) > 0
