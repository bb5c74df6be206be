"""δ against the number of training cases a site actually has (issue 24, "bad configuration is a clear error
before any training"): a site with N training cases refuses δ ≥ 1/N, naming the setting, N and what to set,
before it caches any data or builds any model; the job's plan (what a site policy checks) refuses it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvflare_jobs.config import JobConfig
from nvflare_jobs.fetal_brain import client as client_module
from nvflare_jobs.fetal_brain.client import DPSGDUnavailableError, SiteTrainer
from nvflare_jobs.plan import site_privacy_plan, site_split
from privacy.dpsgd import DPSGDConfig
from tests.nvflare_jobs.conftest import tiny_config

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "grad_sample_mode": "hooks", "seed": 0}


@pytest.fixture
def config(tiny_federation: list[Path]):
    root = tiny_federation[0].parent
    return lambda **privacy: JobConfig.from_dict(tiny_config(root, privacy=privacy))


def _n_train(cfg: JobConfig) -> int:
    return len(site_split(cfg, "site-2").train)


def _no_data_before_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training data was cached before the DP settings were checked")

    monkeypatch.setattr(client_module, "build_train_dataset", refuse)


def test_delta_of_one_over_n_is_refused_before_any_data_is_loaded(config, site_env, monkeypatch) -> None:
    n = _n_train(config())
    assert n == 2  # the tiny federation: 4 cases per site, 2 of them training cases
    cfg = config(dp_sgd={**DP, "delta": 1.0 / n})
    _no_data_before_the_check(monkeypatch)
    with pytest.raises(DPSGDUnavailableError) as err:
        SiteTrainer(cfg, "site-2", job_id="j", device="cpu")
    message = str(err.value)
    for part in ("site-2", "privacy.dp_sgd.delta=0.5", "N=2 training cases", "before any training", "1e-05"):
        assert part in message, (part, message)
    assert not (site_env / "state").exists()  # no DP state, no local part: nothing happened


def test_a_sites_own_dp_section_is_named_in_the_error(config, site_env, monkeypatch) -> None:
    cfg = config(dp_sgd=None, sites={"site-2": {"dp_sgd": {**DP, "delta": 0.7}}})
    _no_data_before_the_check(monkeypatch)
    with pytest.raises(DPSGDUnavailableError, match=r"privacy\.sites\.site-2\.dp_sgd\.delta=0\.7"):
        SiteTrainer(cfg, "site-2", job_id="j", device="cpu")


def test_delta_below_one_over_n_trains(config, site_env) -> None:
    dp = {**DP, "delta": 0.49, "accountant": "rdp"}  # PRV is out of its domain at so large a δ
    trainer = SiteTrainer(config(dp_sgd=dp), "site-2", job_id="j", device="cpu")
    assert trainer.privacy_engine is not None and trainer.privacy_engine.config.delta == 0.49


def test_the_jobs_plan_refuses_it_too(config) -> None:
    """What a site's RequireDPSGD policy computes when the job arrives: refused, with the same words."""
    with pytest.raises(ValueError, match=r"must be < 1/N = 0\.5 for N=2 training cases"):
        site_privacy_plan(config(dp_sgd={**DP, "delta": 0.5}), "site-2")


@pytest.mark.parametrize(("n", "delta", "refused"), [(2, 0.5, True), (10, 0.1, True), (10, 0.099, False)])
def test_the_rule_is_strictly_below_one_over_n(n: int, delta: float, refused: bool) -> None:
    cfg = DPSGDConfig(noise_multiplier=1.0, delta=delta)
    if refused:
        with pytest.raises(ValueError, match="set delta to 1e-05"):
            cfg.check_dataset(n)
    else:
        cfg.check_dataset(n)
