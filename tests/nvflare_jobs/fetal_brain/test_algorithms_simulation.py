"""FedProx and FedOpt, selected in the job config, run two rounds end to end in NVFlare's simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvflare_jobs.fetal_brain.model import PREFIX, FetalBrainNet

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

ALGORITHMS = {
    "fedprox": {"name": "fedprox", "mu": 0.1},
    "fedopt": {"name": "fedopt", "optimizer": {"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}},
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_two_rounds_end_to_end(algorithm: str, tmp_path: Path, make_config, fl_env: dict) -> None:
    from nvflare_jobs.fetal_brain.job import run_simulation

    config = make_config(
        name=f"algo_{algorithm}", algorithm=ALGORITHMS[algorithm], cross_site_eval=False, tracking=None
    )
    run = run_simulation(config, tmp_path / algorithm)
    server_log = (run / "server" / "log.txt").read_text()
    controller = {"fedprox": "FetalFedAvg", "fedopt": "FetalFedOpt"}[algorithm]
    assert controller in server_log
    rows = (run / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(r) for r in rows if r.strip()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2", "site-3"] for r in rounds)
    # the final global model is finite and moved away from the common initial model
    kept = torch.load(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", weights_only=False)
    initial = FetalBrainNet(config["bundle_overrides"], init_seed=0).state_dict()
    final = {k: torch.as_tensor(v) for k, v in kept["model"].items()}
    assert set(final) == set(initial)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.allclose(final[k].float(), initial[k].float()) for k in initial if k.startswith(PREFIX))


def test_the_global_model_starts_from_an_initial_checkpoint(tmp_path: Path, make_config, fl_env: dict) -> None:
    """FedOpt with a zero server learning rate keeps the initial global model: after two rounds the job's
    final model must be the pretrained checkpoint exactly (NVFlare's persistor loaded it, and FedOpt stepped
    from it rather than from its own freshly built network)."""
    from fetalseg.bundle import save_checkpoint
    from nvflare_jobs.fetal_brain.job import run_simulation

    config = make_config(name="algo_initial", cross_site_eval=False, tracking=None)
    pretrained = FetalBrainNet(config["bundle_overrides"], init_seed=123)
    save_checkpoint(pretrained.net, tmp_path / "public.pt")
    config["algorithm"] = {"name": "fedopt", "optimizer": {"path": "torch.optim.SGD", "args": {"lr": 0.0}}}
    config["initial_checkpoint"] = str(tmp_path / "public.pt")
    run = run_simulation(config, tmp_path / "run")
    kept = torch.load(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", weights_only=False)
    final = {k: torch.as_tensor(v) for k, v in kept["model"].items()}
    expected = pretrained.state_dict()
    assert set(final) == set(expected)
    assert all(torch.equal(final[k].float(), expected[k].float()) for k in expected)
    fresh = FetalBrainNet(config["bundle_overrides"], init_seed=0).state_dict()  # what the job starts from otherwise
    assert any(not torch.equal(final[k].float(), fresh[k].float()) for k in fresh)
    sidecar = json.loads((run / "server" / "simulate_job" / "app_server" / "fetal_brain_best.json").read_text())
    assert sidecar["initialized_from"]["file"] == "public.pt"
