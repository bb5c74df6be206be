"""``training.trained_parameters``: validated before training, a site sends a DIFF of only the trained bundle keys,
and NVFlare's FedAvg applies such a partial DIFF key by key (the other weights stay the initial ones)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fetalseg.subspace import parameter_names
from nvflare_jobs.config import ConfigError, JobConfig
from nvflare_jobs.fetal_brain.client import DPSGDUnavailableError, SiteTrainer
from nvflare_jobs.fetal_brain.model import FetalBrainNet


def _config(make_config, spec: str | None, **changes) -> JobConfig:
    training = {} if spec is None else {"trained_parameters": spec}
    return JobConfig.from_dict(make_config(training=training, **changes))


def test_default_trains_every_weight(make_config) -> None:
    assert _config(make_config, None).trained_parameters == "all"


@pytest.mark.parametrize("spec", ["norm+bias+head", "lora:4", " norm "])
def test_known_specs_are_accepted(make_config, spec: str) -> None:
    assert _config(make_config, spec).trained_parameters == spec.strip()


@pytest.mark.parametrize("spec", ["nrom", "norm+", "lora:0", "lora", 3, "", "pgrad:16"])
def test_unknown_or_unshippable_specs_stop_the_job_before_training(make_config, spec) -> None:
    with pytest.raises(ConfigError, match=r"training\.trained_parameters"):
        _config(make_config, spec)


def _one_round(trainer: SiteTrainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    global_model = FetalBrainNet(trainer.config.bundle_overrides, init_seed=0)
    state = trainer.load_global({k: v.numpy() for k, v in global_model.state_dict().items()})
    trainer.train_round()
    return state, trainer.weight_diff(state)


def test_weight_diff_holds_only_the_trained_group_keys(make_config, site_env: Path) -> None:
    trainer = SiteTrainer(_config(make_config, "norm+bias+head"), "site-2", job_id="j", device="cpu")
    state, diff = _one_round(trainer)
    expected = parameter_names(trainer.model, "norm+bias+head")
    assert list(diff) == expected and set(expected) < set(state) and all(k.startswith("net.") for k in diff)
    assert sum(float(d.abs().sum()) for d in diff.values()) > 0
    untrained = trainer.model.state_dict()
    assert all(torch.equal(untrained[k].cpu(), state[k]) for k in state if k not in diff)


def test_lora_weight_diff_is_the_merged_adapter_on_convolution_weights(make_config, site_env: Path) -> None:
    trainer = SiteTrainer(_config(make_config, "lora:4"), "site-2", job_id="j", device="cpu")
    assert trainer.train_model is trainer.view.module and trainer.train_model is not trainer.model
    state, diff = _one_round(trainer)
    assert diff and all(k.startswith("net.") and k.endswith(".weight") for k in diff)
    assert sum(float(d.abs().sum()) for d in diff.values()) > 0
    local = trainer.model.state_dict()
    assert all(torch.allclose(state[k] + diff[k], local[k]) for k in diff)
    assert all(torch.count_nonzero(b) == 0 for b in trainer.view.module.b)  # folded in, adapter reset


def test_dp_sgd_on_an_adapter_is_refused(make_config, site_env: Path) -> None:
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3, "grad_sample_mode": "hooks", "seed": 0}
    config = _config(make_config, "lora:4", privacy={"dp_sgd": dp})
    with pytest.raises(DPSGDUnavailableError, match="adapter"):
        SiteTrainer(config, "site-2", job_id="j", device="cpu")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fedavg_applies_a_partial_diff_in_the_simulator(tmp_path: Path, make_config, fl_env: dict) -> None:
    from nvflare_jobs.fetal_brain.job import run_simulation

    config = make_config(training={"trained_parameters": "norm"}, cross_site_eval=False)
    run = run_simulation(config, tmp_path / "sim")
    log = (run / "server" / "log.txt").read_text()
    assert re.findall(r"round (\d): aggregating updates from all 3 sites", log) == ["0", "1"]
    assert "REJECTED" not in log
    app = run / "server" / "simulate_job" / "app_server"
    final = torch.load(app / "FL_global_model.pt", weights_only=False)["model"]
    initial = FetalBrainNet(config["bundle_overrides"], init_seed=0).state_dict()
    trained = set(parameter_names(FetalBrainNet(config["bundle_overrides"], init_seed=0), "norm"))
    assert set(final) == set(initial)  # the server's model keeps every key
    changed = {k for k in initial if not torch.equal(torch.as_tensor(final[k]), initial[k])}
    assert changed and changed <= trained
