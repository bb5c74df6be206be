"""Distributed DP's one config line: refused (a ConfigError naming the key) wherever the sites' noise would not add
up in what the server unmasks; the site's plan states both ε values and charges the site's trust level."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from nvflare_jobs.config import ConfigError, JobConfig
from nvflare_jobs.plan import dp_settings_for, privacy_plan
from nvflare_jobs.secure_aggregation.distributed import ENV_DP_COLLUDING_SITES
from tests.nvflare_jobs.conftest import TINY_OVERRIDES, tiny_config

DIST = {"noise_multiplier": 2.0, "max_grad_norm": 1.0, "full_batch": True, "distributed": True, "delta": 1e-5}
SECURE = {"secure_aggregation": {"enabled": True, "threshold": 2}}
# the whole optimizer entry (an ``optimizer#_target_`` override fails where train.json is not read, e.g. the server)
OPTIMIZER = {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate"}
SGD = {**TINY_OVERRIDES, "optimizer": OPTIMIZER}


def distributed_config(root: Path, **changes) -> dict:
    cfg = tiny_config(root, num_rounds=3, server=SECURE, bundle_overrides=SGD, privacy={"dp_sgd": dict(DIST)})
    del cfg["training"]["batch_size"]  # full-batch DP-GD: every case in every step
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def test_the_one_config_line_is_accepted(tmp_path: Path) -> None:
    c = JobConfig.from_dict(distributed_config(tmp_path))
    assert c.dp_sgd["distributed"] is True and c.secure_aggregation


def _broken(root: Path, change) -> dict:
    cfg = distributed_config(root)
    change(cfg)
    return cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["server"].pop("secure_aggregation"), r"privacy\.dp_sgd\.distributed: true needs server\.secure"),
        (lambda c: c["privacy"]["dp_sgd"].update(full_batch=False), "full_batch"),
        (lambda c: c["training"].update(local_epochs=2), "local_epochs"),
        (lambda c: c["bundle_overrides"].pop("optimizer"), "linear site optimizer"),
        (lambda c: c["privacy"]["dp_sgd"].update(colluding_sites=0), "colluding_sites"),
        (lambda c: c["privacy"]["dp_sgd"].update(distributed_threshold=1), "filled in by the job"),
        (lambda c: c["privacy"].update(sites={"site-2": {"dp_sgd": dict(DIST)}}), "job-wide"),
        (lambda c: c.update(local={"parameters": "norm"}), r"local\.parameters"),
        (lambda c: c["privacy"]["dp_sgd"].update(ema_decay=0.9), "ema_decay"),
    ],
)
def test_refused_where_the_noise_would_not_add_up(tmp_path: Path, change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict(_broken(tmp_path, change))


def test_plan_states_both_epsilons_and_charges_the_site_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = JobConfig.from_dict(distributed_config(tmp_path))
    plans = {}
    for trust in ("", "0", "1"):
        monkeypatch.setenv(ENV_DP_COLLUDING_SITES, trust)
        settings = dp_settings_for(config, "site-1")
        assert settings["distributed_sites"] == 3 and settings["distributed_threshold"] == 2
        plans[trust] = privacy_plan(settings, dataset_size=20, batch_size=None)
    d = plans[""].distributed
    assert d["site_noise_multiplier"] == pytest.approx(2.0 / 2**0.5) and d["colluding_sites"] == 2
    assert plans[""].epsilon == pytest.approx(d["planned_epsilon_local"])  # default: no gain
    assert plans["0"].epsilon == pytest.approx(d["planned_epsilon_server"])
    assert plans["0"].epsilon < plans[""].epsilon
    assert plans["1"].epsilon == pytest.approx(d["planned_epsilon_local"])  # t − c = 1: own share only
    text = plans["0"].describe()
    assert "against the server alone" in text and "local DP" in text and "charged" in text
    monkeypatch.setenv(ENV_DP_COLLUDING_SITES, "3")
    with pytest.raises(ValueError, match=ENV_DP_COLLUDING_SITES):
        dp_settings_for(config, "site-1")


def test_a_plain_dp_job_is_unchanged(tmp_path: Path) -> None:
    cfg = copy.deepcopy(distributed_config(tmp_path))
    cfg["privacy"]["dp_sgd"].pop("distributed")
    settings = dp_settings_for(JobConfig.from_dict(cfg), "site-1")
    assert "distributed_sites" not in settings
    assert privacy_plan(settings, dataset_size=20, batch_size=None).distributed is None
