"""How the fetal brain recipe turns secure aggregation on (called by :mod:`nvflare_jobs.fetal_brain.job`)."""

from __future__ import annotations

from typing import Any

from nvflare_jobs.config import JobConfig
from nvflare_jobs.secure_aggregation import TASKS
from nvflare_jobs.secure_aggregation.client import SecAggExecutor, SecAggMaskFilter, SecAggTaskCheck


def add_site_side(recipe: Any, config: JobConfig, *, train_task: str, max_update_norm: float) -> None:
    """Every site: the protocol executor, the check on incoming training tasks, and the masking filter.

    Call after the privacy filters and before the site audit filter: NVFlare runs a site's ``privacy.json`` scope
    filters first, then the job's in the order added, so the mask is the last transformation and the audit
    records the masked payload (the same hash the server records).
    """
    executor = SecAggExecutor(
        sites=list(config.sites), threshold=config.secagg_threshold, frac_bits=config.secagg_frac_bits
    )
    recipe._add_to_client_apps(executor, tasks=list(TASKS))
    recipe.add_client_input_filter(SecAggTaskCheck(), tasks=[train_task])
    distributed = bool((config.dp_sgd or {}).get("distributed"))  # job-wide only (nvflare_jobs.config refuses more)
    mask = SecAggMaskFilter(max_update_norm=max_update_norm, distributed_dp=distributed)
    recipe.add_client_output_filter(mask, tasks=[train_task])


def controller_kwargs(config: JobConfig) -> dict[str, Any]:
    return {
        "secagg_sites": list(config.sites),
        "secagg_threshold": config.secagg_threshold,
        "secagg_frac_bits": config.secagg_frac_bits,
    }
