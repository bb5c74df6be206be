"""What a job will do at one site, known before any training: the site's data split and its DP-SGD plan.

Both the client script (:mod:`nvflare_jobs.fetal_brain.client`, which trains) and the site's policy filter
(:class:`nvflare_jobs.site_policy.RequireDPSGD`, which refuses a job before it trains) compute the plan here, so
what a site checks is exactly what it would then do.

* Split: every site's cases are split like the centralized and single-site baselines
  (:func:`fetalseg.baseline.split_site`): the federated job trains on the training cases, selects its best global
  model on the validation cases, and the final cross-site evaluation reports the held-out test cases, the same
  cases every baseline is scored on.
* DP-SGD plan: the job's DP-SGD settings at this site with the job's own plan (``num_rounds`` ×
  ``local_epochs`` passes over the training cases) unless the settings name their own; from it, the ε the site
  will have spent at the end of the job (a target ε is met by calibrating the noise to that plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetalseg.baseline import SiteSplit, split_site
from fetalseg.data.loaders import load_dataset
from nvflare_jobs.config import JobConfig, resolve_site_data


def site_split(config: JobConfig, site: str, data_dir: Path | None = None, *, validate: bool = True) -> SiteSplit:
    """The site's train / validation / test cases (``fetalseg.baseline.split_site`` with ``data.split_seed``);
    ``validate=False`` only lists the cases (the same ones: validation raises, it never drops a case)."""
    folder = Path(data_dir) if data_dir is not None else resolve_site_data(config, site)
    return split_site(load_dataset(folder, site=site, validate=validate), seed=config.split_seed)


def batch_size_for(config: JobConfig) -> int:
    """The training batch size: the job's ``training.batch_size``, else the bundle's ``batch_size``."""
    if config.batch_size:
        return int(config.batch_size)
    from fetalseg.bundle import Bundle

    return int(Bundle("train", overrides=config.bundle_overrides).get("batch_size"))


def dp_settings_for(config: JobConfig, site: str) -> dict[str, Any] | None:
    """The DP-SGD settings ``site`` trains with (the job's plan filled in), or None when DP-SGD is off there."""
    settings = config.dp_sgd_for(site)
    if settings is None:
        return None
    settings = dict(settings)
    if not {"planned_steps", "planned_rounds"} & settings.keys():
        # the job's own plan: ε is then known before training and the engine refuses any step beyond it
        settings.update(planned_rounds=config.num_rounds, local_epochs=config.local_epochs)
    return settings


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD a site will run in a job, and the ε it will have spent when the plan is complete."""

    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    dataset_size: int
    batch_size: int
    accountant: str

    def describe(self) -> str:
        return (
            f"ε={self.epsilon:.4g} at δ={self.delta:g} after {self.steps} DP-SGD steps "
            f"(σ={self.noise_multiplier:.3g}, q={self.sample_rate:.3g}, N={self.dataset_size} training cases, "
            f"{self.accountant} accountant)"
        )


def privacy_plan(settings: Mapping[str, Any], *, dataset_size: int, batch_size: int | None) -> PrivacyPlan:
    """The plan for DP-SGD ``settings`` (as from :func:`dp_settings_for`); raises ValueError for settings the
    DP-SGD engine would refuse (and for a config without a plan: its ε could not be known in advance)."""
    from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine

    config = DPSGDConfig.from_dict(settings)
    if getattr(config, "full_batch", False):
        batch_size = None  # full-batch DP-GD: every training case in every step, no batch size of its own
    engine = SitePrivacyEngine(config=config, dataset_size=dataset_size, batch_size=batch_size, state_path=None)
    if engine.planned_epsilon is None or engine.planned_steps is None:
        raise ValueError("the DP-SGD settings have no plan (planned_steps or planned_rounds + local_epochs)")
    return PrivacyPlan(
        epsilon=float(engine.planned_epsilon),
        delta=float(engine.config.delta),
        steps=int(engine.planned_steps),
        noise_multiplier=float(engine.noise_multiplier),
        sample_rate=float(engine.sample_rate),
        dataset_size=int(dataset_size),
        batch_size=int(batch_size) if batch_size is not None else int(dataset_size),
        accountant=str(engine.config.accountant),
    )


def site_privacy_plan(
    config: JobConfig, site: str, data_dir: Path | None = None, *, validate: bool = True
) -> PrivacyPlan | None:
    """The DP-SGD plan of ``config`` at ``site`` on the site's own training cases; None when DP-SGD is off."""
    settings = dp_settings_for(config, site)
    if settings is None:
        return None
    split = site_split(config, site, data_dir, validate=validate)
    return privacy_plan(settings, dataset_size=len(split.train), batch_size=batch_size_for(config))
