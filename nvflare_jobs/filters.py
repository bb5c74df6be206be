"""Client-side privacy filters built from the job config, wired the way NVFlare 2.9 needs them.

NVFlare's ``PercentilePrivacy`` and ``SVTPrivacy`` only make sense on weight DIFFERENCES: on full weights the
percentile filter clips every weight and destroys the model, and a filter whose ``data_kinds`` do not match the
update's kind is skipped without a word. Jobs built here always send ``WEIGHT_DIFF`` (``TransferType.DIFF``),
and every filter is created with ``data_kinds=["WEIGHT_DIFF"]`` so the two can never disagree. Parameter checks
(e.g. ``gamma > 0``, an explicit SVT ``epsilon_release``) happen earlier, in :mod:`nvflare_jobs.config`; the
project's own filters (``privacy.nvflare_filters``) check their arguments when constructed here, i.e. when the
job is built, not when the first update is filtered.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from nvflare.apis.dxo import DataKind
from nvflare.apis.filter import Filter
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

from nvflare_jobs.config import PROJECT_FILTERS, ConfigError, FilterSpec

log = logging.getLogger(__name__)

UPDATE_KINDS = [DataKind.WEIGHT_DIFF]
# ‖N(0, s²·I_d)‖ > s·(√d + t) with probability < exp(-t²/2): about 1e-14 at t = 8 (Gaussian norm concentration)
NOISE_NORM_MARGIN = 8.0


def import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"filter class {path!r}: cannot import {module_name!r} ({e})") from e
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"filter class {path!r}: {module_name!r} has no class {class_name!r}")
    return cls


def build_filter(spec: FilterSpec) -> Filter:
    """The NVFlare ``Filter`` object for one :class:`~nvflare_jobs.config.FilterSpec`."""
    if spec.type == "percentile":
        return PercentilePrivacy(percentile=spec.args["percentile"], gamma=spec.args["gamma"], data_kinds=UPDATE_KINDS)
    if spec.type == "svt":
        return SVTPrivacy(**spec.args, data_kinds=UPDATE_KINDS)
    return build_class_filter(str(spec.path), spec.args)


def build_class_filter(path: str, args: Mapping[str, Any]) -> Filter:
    """A filter by class path (the project's ``privacy.nvflare_filters`` or any other NVFlare ``Filter``)."""
    cls = import_class(path)
    if not issubclass(cls, Filter):
        raise ConfigError(f"filter class {path!r} is not an NVFlare Filter")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"filter {path!r} rejected its arguments {dict(args)}: {e}") from e


def client_dp_norm_bound(specs: Iterable[FilterSpec], num_weights: int) -> float | None:
    """The L2 norm no client-DP update exceeds (but with probability < 1e-14), or None without a client-DP filter.

    Why: the server's update guard must expect the noise. A clipped update has norm <= clip_norm, and the noise
    added to its d weights has norm ~ noise_multiplier·clip_norm·√d (≈ 779·σ·C for the bundle U-Net's ~606,000
    weights): with the default ``server.max_update_norm`` of 1000, every update noised with σ·C > 1.28 was rejected
    and the job failed. Call after the filters were built (their constructors checked these arguments).
    """
    bounds = [
        float(spec.args["clip_norm"])
        * (1.0 + float(spec.args["noise_multiplier"]) * (math.sqrt(num_weights) + NOISE_NORM_MARGIN))
        for spec in specs
        if spec.path == PROJECT_FILTERS["client_dp"]
    ]
    return max(bounds, default=None)
