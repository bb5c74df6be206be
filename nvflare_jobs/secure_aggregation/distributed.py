"""Distributed DP's job-level wiring: the one config line, what it is refused with, and the site's trust setting.

``"privacy": {"dp_sgd": {"distributed": true, "noise_multiplier": 2.0, ...}}`` means: the unmasked SUM carries
noise multiplier σ (or the σ a ``target_epsilon`` needs) against the server alone; each site adds σ/√t
(:mod:`privacy.secure_aggregation.distributed_dp`). The job fills in the number of sites and the threshold; the site
admin chooses, in the client's environment (``FETAL_FL_DP_COLLUDING_SITES``, like the ledger's
``FETAL_FL_PRIVACY_LEDGER``), how many other sites its ledger assumes collude with the server (default: all of them,
i.e. the local-DP ε of σ/√t: no gain unless the site opts in). The site's plan, its policy check and its ledger
all read the same setting through :func:`nvflare_jobs.plan.dp_settings_for`.

Refused (``ConfigError`` naming the key) wherever the sites' noise would not add up in what the server sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fetalseg.settings import DistributedDPSettings, env_names

# the site's trust for distributed DP ("all" or an integer c), read by fetalseg.settings.DistributedDPSettings
ENV_DP_COLLUDING_SITES = env_names(DistributedDPSettings, "dp_colluding_sites")[0]
KEY = "privacy.dp_sgd.distributed"
SGD = "torch.optim.SGD"
_JOB_FILLED = ("distributed_sites", "distributed_threshold")


def _is_distributed(settings: Any) -> bool:
    return isinstance(settings, Mapping) and settings.get("distributed") is True


def check_distributed_dp(
    raw: Mapping[str, Any],
    *,
    secure_aggregation: bool,
    local_epochs: int,
    local_parameters: str,
) -> None:
    """Refuse ``privacy.dp_sgd.distributed`` where the sum the server unmasks would not carry the sites' noise."""
    from nvflare_jobs.config import ConfigError

    privacy = raw.get("privacy") or {}
    dp = privacy.get("dp_sgd")
    per_site = privacy.get("sites") or {}
    site_dp = {s: v.get("dp_sgd") for s, v in per_site.items() if isinstance(v, Mapping) and "dp_sgd" in v}
    if any(_is_distributed(v) for v in site_dp.values()):
        raise ConfigError("privacy.sites.<site>.dp_sgd.distributed: distributed DP is set job-wide (privacy.dp_sgd)")
    if not _is_distributed(dp):
        return
    if site_dp:
        raise ConfigError(
            f"{KEY} needs every site to add its share with the same settings: remove privacy.sites.<site>.dp_sgd "
            f"(set for {sorted(site_dp)})"
        )
    for key in (*_JOB_FILLED, "colluding_sites"):
        if key in dp:
            who = "the site's (" + ENV_DP_COLLUDING_SITES + ")" if key == "colluding_sites" else "filled in by the job"
            raise ConfigError(f"privacy.dp_sgd.{key} is {who}, not a job setting: remove it")
    sa = (raw.get("server") or {}).get("secure_aggregation")
    if not secure_aggregation:
        raise ConfigError(
            f"{KEY}: true needs server.secure_aggregation.enabled: true (without it the server sees each site's "
            "update, which then carries only the site's share of the noise)"
        )
    if isinstance(sa, Mapping) and sa.get("method", "masking") != "masking":
        raise ConfigError(f"{KEY}: true needs server.secure_aggregation.method 'masking', got {sa.get('method')!r}")
    if local_epochs != 1:
        raise ConfigError(f"{KEY}: true needs training.local_epochs = 1 (one DP-GD step per round), got {local_epochs}")
    if dp.get("full_batch") is not True:
        raise ConfigError(f"{KEY}: true needs privacy.dp_sgd.full_batch: true (one DP-GD step over every case)")
    if local_parameters != "none":
        raise ConfigError(
            f"{KEY}: true cannot be combined with local.parameters={local_parameters!r} (a site-local part makes each "
            "site's gradient depend on what only that site knows)"
        )
    overrides = raw.get("bundle_overrides") or {}
    target = overrides.get("optimizer#_target_") or (overrides.get("optimizer") or {}).get("_target_")
    if target != SGD:
        raise ConfigError(
            f'{KEY}: true needs a linear site optimizer: bundle_overrides {{"optimizer": {{"_target_": "{SGD}", '
            '"params": "$@network.parameters()", "lr": "@learning_rate"}} (the bundle\'s is AdamW, whose per-site '
            f"step would not let the sites' noise add up), got {target!r}"
        )


def colluding_sites_from_env(sites: int, environ: Mapping[str, str] | None = None) -> int | None:
    """The site admin's choice (None: every other site may collude, the conservative default)."""
    from privacy.secure_aggregation.distributed_dp import parse_colluding

    trust = DistributedDPSettings.load(environ).dp_colluding_sites
    try:
        return parse_colluding(trust, sites)
    except ValueError as e:
        raise ValueError(f"{ENV_DP_COLLUDING_SITES}: {e}") from None


def fill_distributed(settings: dict[str, Any], *, sites: int, threshold: int) -> dict[str, Any]:
    """``settings`` with the job's sites, threshold and this site's trust filled in (unchanged if not distributed)."""
    if not settings.get("distributed"):
        return settings
    return {
        **settings,
        "distributed_sites": sites,
        "distributed_threshold": threshold,
        "colluding_sites": colluding_sites_from_env(sites),
    }
