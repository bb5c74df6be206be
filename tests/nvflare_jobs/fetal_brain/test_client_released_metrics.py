"""A DP-SGD site's own validation and evaluation, without NVFlare: what its metrics may say goes through one gate."""

from __future__ import annotations

from fetalseg.labels import foreground_labels
from nvflare_jobs.config import JobConfig
from nvflare_jobs.fetal_brain.client import SiteTrainer
from nvflare_jobs.fetal_brain.model import FetalBrainNet

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "grad_sample_mode": "hooks", "seed": 0}
TISSUES = [t.name for t in foreground_labels()]


def _trainer(make_config, **privacy) -> SiteTrainer:
    config = JobConfig.from_dict(make_config(privacy={"dp_sgd": DP, **privacy}))
    trainer = SiteTrainer(config, "site-2", job_id="job-1", device="cpu")
    trainer.load_global(FetalBrainNet(config.bundle_overrides, init_seed=0).state_dict())
    return trainer


def test_by_default_a_dp_site_sends_only_counts(make_config, site_env) -> None:
    trainer = _trainer(make_config)
    assert trainer.validate() == {"val_cases": 1.0}
    assert trainer.evaluate() == {"val_cases": 1.0, "test_cases": 1.0}  # no Dice, no HD95
    report = trainer.record_privacy(0)
    assert report["metrics"]["releases"] == 0 and report["epsilon"] == report["epsilon_dp_sgd"]


def test_with_metrics_noise_a_dp_site_sends_noised_dice_and_counts_each_release(make_config, site_env) -> None:
    trainer = _trainer(make_config, metrics={"noise_multiplier": 50.0, "seed": 0})
    metrics = trainer.evaluate()
    expected = {"val_cases", "test_cases"} | {f"{p}_mean_dice" for p in ("val", "test")}
    expected |= {f"{p}_dice_{t}" for p in ("val", "test") for t in TISSUES}
    assert set(metrics) == expected and all(0.0 <= v <= 1.0 for k, v in metrics.items() if "dice" in k)
    report = trainer.record_privacy(0)
    assert report["metrics"]["releases"] == 2 and report["epsilon"] > report["epsilon_dp_sgd"]
