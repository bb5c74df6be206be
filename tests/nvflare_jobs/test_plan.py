"""A site's plan, known before training: the baselines' split and the DP-SGD ε the job will spend there."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetalseg.baseline import split_site
from fetalseg.data.loaders import load_dataset
from nvflare_jobs.config import JobConfig
from nvflare_jobs.plan import dp_settings_for, privacy_plan, site_privacy_plan, site_split


def test_the_job_splits_each_site_exactly_like_the_baselines(make_config, federation: Path) -> None:
    cfg = JobConfig.from_dict(make_config(data={"split_seed": 1}))
    for site in ("site-1", "site-3"):
        ours = site_split(cfg, site)
        theirs = split_site(load_dataset(federation / site), seed=1)
        for part in ("train", "val", "test"):
            assert [c.case_id for c in getattr(ours, part)] == [c.case_id for c in getattr(theirs, part)]
        assert ours.train and ours.val and ours.test  # 4 cases: 2 train, 1 validation, 1 held-out test
        ids = [c.case_id for part in (ours.train, ours.val, ours.test) for c in part]
        assert len(ids) == len(set(ids)) == 4


def test_the_dp_plan_is_the_jobs_rounds_times_local_epochs(make_config) -> None:
    cfg = JobConfig.from_dict(
        make_config(num_rounds=3, training={"local_epochs": 2}, privacy={"dp_sgd": {"noise_multiplier": 1.0}})
    )
    assert dp_settings_for(cfg, "site-1") == {"noise_multiplier": 1.0, "planned_rounds": 3, "local_epochs": 2}
    explicit = cfg.with_changes(privacy={"dp_sgd": {"noise_multiplier": 1.0, "planned_steps": 5}})
    assert dp_settings_for(explicit, "site-1") == {"noise_multiplier": 1.0, "planned_steps": 5}
    assert dp_settings_for(cfg.with_changes(privacy={"dp_sgd": None}), "site-1") is None


def test_planned_epsilon_grows_with_rounds_and_meets_a_target(make_config) -> None:
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}
    short = site_privacy_plan(JobConfig.from_dict(make_config(num_rounds=1, privacy={"dp_sgd": dp})), "site-2")
    long = site_privacy_plan(JobConfig.from_dict(make_config(num_rounds=20, privacy={"dp_sgd": dp})), "site-2")
    assert short.dataset_size == 2 and short.batch_size == 1 and short.steps == 2 and long.steps == 40
    assert 0 < short.epsilon < long.epsilon
    assert f"{long.epsilon:.4g}" in long.describe() and "40 DP-SGD steps" in long.describe()
    target = privacy_plan(
        {"target_epsilon": 4.0, "max_grad_norm": 1.0, "delta": 1e-3, "planned_rounds": 5, "local_epochs": 1},
        dataset_size=2,
        batch_size=1,
    )
    assert target.epsilon == pytest.approx(4.0, rel=0.05) and target.epsilon <= 4.0 + 1e-6
    with pytest.raises(ValueError, match="delta"):  # what the DP-SGD engine would refuse, refused here too
        privacy_plan({"noise_multiplier": 1.0, "delta": 0.9, "planned_steps": 2}, dataset_size=2, batch_size=1)


def test_the_plans_epsilon_is_what_the_ledger_is_charged_with_noised_metrics(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole job at one site (every round's validation, training and the final evaluation of the final and the
    best model), run with the client's own trainer: the ledger ends charged exactly the plan's ε, DP-SGD and the
    noised Dice releases composed; the plan of DP-SGD alone would have promised less."""
    import torch

    from nvflare_jobs.config import ENV_PRIVACY_LEDGER, ENV_SITE_DATA, ENV_SITE_STATE
    from nvflare_jobs.fetal_brain.client import SiteTrainer
    from nvflare_jobs.fetal_brain.model import FetalBrainNet
    from privacy.ledger import SiteLedger
    from privacy.released_metrics import planned_releases

    monkeypatch.setenv(ENV_SITE_STATE, str(tmp_path / "state"))
    for var in (ENV_SITE_DATA, "FETALFL_DATA_ROOT"):
        monkeypatch.delenv(var, raising=False)
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=1.0e6, delta_budget=0.5, site="site-2")
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    torch.set_num_threads(1)
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "grad_sample_mode": "hooks", "seed": 0}
    cfg = JobConfig.from_dict(
        make_config(num_rounds=2, privacy={"dp_sgd": dp, "metrics": {"noise_multiplier": 20.0, "seed": 0}})
    )
    plan = site_privacy_plan(cfg, "site-2")
    releases = planned_releases(num_rounds=2, cross_site_eval=True)
    assert plan.metrics_releases == releases == 6 and plan.metrics_noise_multiplier == 20.0
    assert plan.epsilon > plan.epsilon_dp_sgd and f"{releases} noised metrics releases" in plan.describe()

    trainer = SiteTrainer(cfg, "site-2", job_id="job-1", device="cpu")
    model = FetalBrainNet(cfg.bundle_overrides, init_seed=0).state_dict()
    for rnd in range(cfg.num_rounds):  # what main() does per round: validate, train, record, send
        trainer.load_global(model)
        sent = trainer.validate()
        trainer.train_round()
        trainer.record_privacy(rnd)
        assert "val_mean_dice" in sent
    for _ in range(2):  # the final evaluation of the final and the best global model: validation + test each
        trainer.load_global(model)
        assert "test_mean_dice" in trainer.released.release(trainer.evaluate())
        trainer.record_privacy(cfg.num_rounds)
    assert trainer.released.releases == releases and trainer.privacy_engine.steps == plan.steps
    trainer.finish()
    ledger.reload()
    assert ledger.spent("site-2/site-2").epsilon == pytest.approx(plan.epsilon, rel=1e-9)


def test_without_metrics_noise_the_plan_is_dp_sgd_alone(make_config) -> None:
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    plan = site_privacy_plan(JobConfig.from_dict(make_config(privacy={"dp_sgd": dp})), "site-2")
    assert plan.metrics_releases == 0 and plan.epsilon == plan.epsilon_dp_sgd and "metrics" not in plan.describe()
