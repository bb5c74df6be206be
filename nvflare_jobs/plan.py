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
* Metrics releases: with ``privacy.metrics.noise_multiplier`` set, a DP site sends noised Dice, each release
  composed with DP-SGD's steps in the same accountant (:mod:`privacy.released_metrics`). The plan's ε includes the
  job's planned releases (one per round, plus validation and test of each model the final evaluation scores), so
  the ε a site's policy checks before training is the ε its ledger is charged at the end. A ``target_epsilon``
  calibrates DP-SGD's noise only: the metrics come on top, and the plan says so.
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
    from nvflare_jobs.secure_aggregation.distributed import fill_distributed

    # distributed DP: the job's sites and threshold, and this site's trust (FETAL_FL_DP_COLLUDING_SITES)
    return fill_distributed(settings, sites=len(config.sites), threshold=config.secagg_threshold)


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD a site will run in a job (and the metrics it will release), and the ε it will have spent when
    the plan is complete: ``epsilon`` is everything composed, what the site's ledger is charged."""

    epsilon: float
    delta: float
    steps: int
    noise_multiplier: float
    sample_rate: float
    dataset_size: int
    batch_size: int
    accountant: str
    epsilon_dp_sgd: float | None = None  # DP-SGD's steps alone (None: equal to ``epsilon``)
    metrics_noise_multiplier: float | None = None  # privacy.metrics.noise_multiplier (None: Dice withheld)
    metrics_releases: int = 0  # planned Gaussian releases of the noised Dice
    # distributed DP (privacy.secure_aggregation.distributed_dp): ``epsilon`` is the ε the site's trust level
    # charges; these are the planned ε against the server alone and against the server + every other site
    distributed: dict[str, Any] | None = None

    def describe(self) -> str:
        text = (
            f"ε={self.epsilon:.4g} at δ={self.delta:g} after {self.steps} DP-SGD steps "
            f"(σ={self.noise_multiplier:.3g}, q={self.sample_rate:.3g}, N={self.dataset_size} training cases, "
            f"{self.accountant} accountant)"
        )
        if self.metrics_releases and self.metrics_noise_multiplier is not None:
            sgd = self.epsilon if self.epsilon_dp_sgd is None else self.epsilon_dp_sgd
            text += (
                f" and {self.metrics_releases} noised metrics releases (σ={self.metrics_noise_multiplier:.3g}), "
                f"composed; DP-SGD alone ε={sgd:.4g}"
            )
        d = self.distributed
        if d:
            text += (
                f"; distributed DP under secure aggregation: this site adds σ_site={d['site_noise_multiplier']:.3g} "
                f"(the sum of any {d['threshold']} of the {d['sites']} sites carries "
                f"σ={d['aggregate_noise_multiplier']:.3g}): ε={d['planned_epsilon_server']:.4g} against the server "
                f"alone, ε={d['planned_epsilon_local']:.4g} against the server + every other site (local DP); "
                f"charged: ε={d['planned_epsilon_charged']:.4g} (assumes {d['colluding_sites']} colluding site(s))"
            )
        return text


def privacy_plan(
    settings: Mapping[str, Any],
    *,
    dataset_size: int,
    batch_size: int | None,
    metrics: Mapping[str, Any] | None = None,
    metrics_releases: int = 0,
) -> PrivacyPlan:
    """The plan for DP-SGD ``settings`` (as from :func:`dp_settings_for`) and, when ``metrics`` (the job's
    ``privacy.metrics``) noises them, ``metrics_releases`` Dice releases composed with it in one accountant;
    raises ValueError for settings the DP-SGD engine would refuse (and for a config without a plan: its ε could
    not be known in advance)."""
    from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine
    from privacy.released_metrics import MetricsPolicy, SiteMetricsRelease

    config = DPSGDConfig.from_dict(settings)
    if getattr(config, "full_batch", False):
        batch_size = None  # full-batch DP-GD: every training case in every step, no batch size of its own
    engine = SitePrivacyEngine(config=config, dataset_size=dataset_size, batch_size=batch_size, state_path=None)
    if engine.planned_epsilon is None or engine.planned_steps is None:
        raise ValueError("the DP-SGD settings have no plan (planned_steps or planned_rounds + local_epochs)")
    # the client's own gate computes the composed plan: the same object, so the same number
    gate = SiteMetricsRelease(
        engine=engine,
        policy=MetricsPolicy.from_dict(metrics),
        delta=engine.config.delta,
        accountant=engine.config.accountant,
        max_releases=int(metrics_releases),
    )
    planned = gate.planned_epsilon
    noised = gate.noising and int(metrics_releases) > 0
    extra = [(float(gate.policy.noise_multiplier), 1.0, int(metrics_releases))] if noised else []  # type: ignore[arg-type]
    distributed = engine.distributed_report(extra).get("distributed_dp")
    return PrivacyPlan(
        epsilon=float(planned if planned is not None else engine.planned_epsilon),
        delta=float(engine.config.delta),
        steps=int(engine.planned_steps),
        noise_multiplier=float(engine.noise_multiplier),
        sample_rate=float(engine.sample_rate),
        dataset_size=int(dataset_size),
        batch_size=int(batch_size) if batch_size is not None else int(dataset_size),
        accountant=str(engine.config.accountant),
        epsilon_dp_sgd=float(engine.planned_epsilon),
        metrics_noise_multiplier=gate.policy.noise_multiplier if noised else None,
        metrics_releases=int(metrics_releases) if noised else 0,
        distributed=distributed,
    )


def site_privacy_plan(
    config: JobConfig, site: str, data_dir: Path | None = None, *, validate: bool = True
) -> PrivacyPlan | None:
    """The privacy plan of ``config`` at ``site`` on the site's own training cases (DP-SGD and the job's noised
    metrics releases, composed); None when DP-SGD is off."""
    from privacy.released_metrics import planned_releases

    settings = dp_settings_for(config, site)
    if settings is None:
        return None
    split = site_split(config, site, data_dir, validate=validate)
    return privacy_plan(
        settings,
        dataset_size=len(split.train),
        batch_size=batch_size_for(config),
        metrics=metrics_policy_for(config),
        metrics_releases=planned_releases(num_rounds=config.num_rounds, cross_site_eval=config.cross_site_eval),
    )


def metrics_policy_for(config: JobConfig) -> Mapping[str, Any] | None:
    """The job's ``privacy.metrics`` (how a DP site releases its Dice), as the client reads it."""
    return (config.raw.get("privacy") or {}).get("metrics")
