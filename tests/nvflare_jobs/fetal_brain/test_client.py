"""A site's round without NVFlare: data discovery, validation metrics, the DIFF it sends, DP-SGD wiring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fetalseg.labels import foreground_labels
from nvflare_jobs.config import ENV_PRIVACY_LEDGER, ENV_SITE_DATA, JobConfig
from nvflare_jobs.fetal_brain.client import DPSGDUnavailableError, SiteTrainer
from nvflare_jobs.fetal_brain.model import FetalBrainNet
from nvflare_jobs.plan import site_privacy_plan, site_split

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3, "grad_sample_mode": "hooks", "seed": 0}


def _trainer(make_config, **changes) -> SiteTrainer:
    return SiteTrainer(JobConfig.from_dict(make_config(**changes)), "site-2", job_id="job-1", device="cpu")


def test_one_round_sends_a_finite_nonzero_diff_and_per_tissue_metrics(make_config, site_env: Path) -> None:
    trainer = _trainer(make_config)
    assert trainer.data_dir.name == "site-2" and trainer.train_cases and trainer.val_cases and trainer.test_cases
    global_model = FetalBrainNet(trainer.config.bundle_overrides, init_seed=0)
    state = trainer.load_global({k: v.numpy() for k, v in global_model.state_dict().items()})
    metrics = trainer.validate()
    assert set(metrics) == {"val_mean_dice", "val_cases", *(f"val_dice_{t.name}" for t in foreground_labels())}
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    stats = trainer.train_round()
    assert stats.steps == 2 and stats.samples == 2  # max_steps_per_epoch=2, batch_size=1
    diff = trainer.weight_diff(state)
    assert list(diff) == list(global_model.state_dict())
    flat = torch.cat([d.flatten() for d in diff.values()])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    # the diff is local - global: adding it to the global weights gives the trained model
    trained = trainer.model.state_dict()
    assert all(torch.allclose(state[k] + diff[k], trained[k].cpu()) for k in diff)


def test_trains_validates_and_tests_on_the_baselines_split(make_config, site_env: Path) -> None:
    trainer = _trainer(make_config)
    split = site_split(trainer.config, "site-2")
    assert [c.case_id for c in trainer.train_cases] == [c.case_id for c in split.train]
    assert [c.case_id for c in trainer.val_cases] == [c.case_id for c in split.val]
    assert [c.case_id for c in trainer.test_cases] == [c.case_id for c in split.test]
    assert len(trainer.loader.dataset) == len(split.train)  # trains on the training cases only
    trainer.load_global(FetalBrainNet(trainer.config.bundle_overrides, init_seed=0).state_dict())
    metrics = trainer.evaluate()  # cross-site evaluation: validation (selection) and held-out test (reported)
    tissues = [t.name for t in foreground_labels()]
    assert metrics["val_cases"] == len(split.val) and metrics["test_cases"] == len(split.test)
    assert all(
        f"val_dice_{t}" in metrics and f"test_dice_{t}" in metrics and f"test_hd95_{t}" in metrics for t in tissues
    )
    assert metrics["val_mean_dice"] == pytest.approx(trainer.validate()["val_mean_dice"])


def test_the_site_data_env_var_wins(make_config, site_env: Path, federation: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_SITE_DATA, str(federation / "site-3"))
    trainer = _trainer(make_config)
    assert trainer.data_dir == federation / "site-3" and trainer.site == "site-2"


def test_dp_sgd_is_set_up_once_and_reports_epsilon_to_the_ledger(make_config, site_env, monkeypatch) -> None:
    from privacy.ledger import SiteLedger

    ledger = SiteLedger.init(site_env / "ledger.jsonl", epsilon_budget=1.0e6, delta_budget=0.5, site="site-2")
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    trainer = _trainer(make_config, privacy={"dp_sgd": DP})
    assert trainer.train_model is not trainer.model  # the Opacus-wrapped module
    ledger.reload()
    held = ledger.dataset_status("site-2/site-2")
    assert held.reserved_epsilon == pytest.approx(trainer.privacy_engine.planned_epsilon)  # held before training
    state = trainer.load_global(trainer.model.state_dict())
    trainer.train_round()
    report = trainer.record_privacy(0)
    assert report["epsilon"] > 0 and report["steps"] >= 1 and report["planned_steps"] is not None
    plan = site_privacy_plan(trainer.config, "site-2")  # what the site's policy checks before the job trains
    assert report["planned_steps"] == plan.steps and report["planned_epsilon"] == pytest.approx(plan.epsilon)
    assert (site_env / "state" / "dpsgd_site-2_job-1.json").is_file()
    ledger.reload()
    assert ledger.spent("site-2/site-2").epsilon == pytest.approx(report["epsilon"])
    freed = trainer.finish()  # the job's clean end gives back what it did not spend
    ledger.reload()
    assert freed == pytest.approx(report["planned_epsilon"] - report["epsilon"], rel=1e-6)
    assert ledger.dataset_status("site-2/site-2").reserved_epsilon == 0.0
    assert ledger.spent("site-2/site-2").epsilon == pytest.approx(report["epsilon"])  # the spend stays
    assert torch.isfinite(torch.cat([d.flatten() for d in trainer.weight_diff(state).values()])).all()


def test_a_site_over_its_privacy_budget_refuses_before_training(make_config, site_env, monkeypatch) -> None:
    from privacy.ledger import SiteLedger

    ledger = SiteLedger.init(site_env / "ledger.jsonl", epsilon_budget=0.01, delta_budget=0.5)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    with pytest.raises(DPSGDUnavailableError, match="budget"):
        _trainer(make_config, privacy={"dp_sgd": DP})


def test_requested_dp_sgd_never_silently_falls_back(make_config, site_env, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "privacy.dpsgd", None)  # as if the privacy package were not installed
    with pytest.raises(DPSGDUnavailableError, match="refusing to train without it"):
        _trainer(make_config, privacy={"dp_sgd": DP})
    with pytest.raises(DPSGDUnavailableError, match="could not be set up"):
        monkeypatch.delitem(sys.modules, "privacy.dpsgd")
        _trainer(make_config, privacy={"dp_sgd": {**DP, "delta": 0.9}})  # δ ≥ 1/N is refused by the engine


def test_only_the_site_named_gets_dp_sgd(make_config, site_env) -> None:
    trainer = _trainer(make_config, privacy={"sites": {"site-1": {"dp_sgd": DP}}})
    assert trainer.privacy_engine is None and trainer.record_privacy(0) is None


def test_fedprox_round_anchors_on_the_received_model(make_config, site_env) -> None:
    trainer = _trainer(make_config, algorithm={"name": "fedprox", "mu": 1.0})
    state = trainer.load_global(FetalBrainNet(trainer.config.bundle_overrides, init_seed=0).state_dict())
    stats = trainer.train_round(fedprox_mu=1.0)
    diff = torch.cat([d.flatten() for d in trainer.weight_diff(state).values()])
    assert stats.steps == 2 and torch.isfinite(diff).all() and diff.abs().sum() > 0
    assert all(p.requires_grad for p in trainer.model.parameters())  # only the anchor copy is frozen
