"""The one config file of a federated job: every knob an ML engineer changes, validated before anything runs.

A job is described by one JSON or YAML file (see ``nvflare_jobs/fetal_brain/config.json``). Changing the
algorithm, a filter, ε or the number of rounds is a one-line edit there plus a rerun; nothing else is touched.
The same file travels inside the exported job folder, so the clients read exactly what the server was built
from, and an auditor can read what a site agreed to.

Validation is strict on purpose: an unknown key (a typo such as ``"percentil"``) or a value NVFlare would
accept and then silently ignore (a percentile filter with ``gamma <= 0`` passes updates through unfiltered)
is an error here, never a quietly weaker privacy setting.

``server.aggregation`` chooses how the server combines a round's weight DIFFs
(:mod:`nvflare_jobs.robust_aggregation`)::

    "server": {"aggregation": {"method": "trimmed_mean", "trim_fraction": 0.2, "clip_update_norm": 5.0}}

* ``method``: ``"mean"`` (default: NVFlare's step-weighted FedAvg mean, bit-identical to jobs without the key),
  ``"trimmed_mean"`` (coordinate-wise: drop the ``floor(trim_fraction * n)`` lowest and highest of the ``n`` sites'
  values of every weight, average the rest) or ``"median"`` (coordinate-wise median). The last two are unweighted
  (a site's step count is self-reported; weighting by it would let a poisoning site buy a majority) and hold a
  round's updates in memory.
* ``trim_fraction`` (``trimmed_mean`` only, required there): in ``[0, 0.5)``; it must drop at least one site per
  side at the job's number of sites (anything less is the plain mean). A round with fewer updates than sites
  trims ``floor(trim_fraction * n)`` of what arrived (logged when that is none).
* ``clip_update_norm`` (any method; default null = no bound): each site's DIFF is scaled to at most this L2 norm
  before combining; it must be below ``max_update_norm`` (the guard rejects anything above that, so a larger clip
  would never act).

DP noise is added at the sites: this is post-processing and changes no ε. Secure aggregation (the server sees only
the sum) cannot be combined with ``median``, ``trimmed_mean`` or server-side clipping.

``server.secure_aggregation`` (:mod:`nvflare_jobs.secure_aggregation`, docs/secure_aggregation.md) turns on pairwise
masking: ``{"enabled": true, "threshold": 2}``; ``threshold`` (default: a bare majority of the sites) must be a strict
majority of the sites and at most their number; ``frac_bits`` (default 16) is the fixed-point precision.
``"method": "he"`` (default ``"masking"``) uses NVFlare's homomorphic encryption (TenSEAL CKKS) instead; what it
cannot run with is refused by :func:`nvflare_jobs.secure_aggregation.he.check_he_config`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# a site's variables (data folder, data root, per-job state, ledger), read by fetalseg.settings.SiteSettings
from fetalseg.site_env import (  # noqa: F401
    ENV_DATA_ROOT,
    ENV_PRIVACY_LEDGER,
    ENV_SITE_DATA,
    ENV_SITE_STATE,
    SiteDataError,
    site_data_dir,
)

ALGORITHMS = ("fedavg", "fedprox", "fedopt")
AGGREGATION_METHODS = ("mean", "trimmed_mean", "median")  # nvflare_jobs.robust_aggregation.METHODS
# Project filters (privacy.nvflare_filters) by short name; their own constructors check their arguments.
PROJECT_FILTERS = {
    "fail_closed_percentile": "privacy.nvflare_filters.FailClosedPercentilePrivacy",
    "sparse_percentile": "privacy.nvflare_filters.SparsePercentileFilter",
    "client_dp": "privacy.nvflare_filters.ClientDPFilter",
}
SPARSE_DECODER = "privacy.nvflare_filters.SparseUpdateDecoder"  # server side of "sparse_percentile"
FILTER_TYPES = ("percentile", "svt", *PROJECT_FILTERS, "class")
TRACKERS = ("tensorboard", None)
# measured in bench/results/fl_overhead_long.md: 1.07× NVFlare ÷ local end to end at 0.1 s vs 1.20× at 0.5 s
DEFAULT_TASK_REQUEST_INTERVAL_S = 0.1
CONFIG_FILE_NAME = "fetal_fl_job.json"  # name of the config inside an exported job's custom/ folder

# where the client puts privacy.dpsgd.SitePrivacyEngine.report() in an update's meta (checked by site_policy)
DP_REPORT_KEY = "dp_sgd"


class ConfigError(ValueError):
    """A job config that cannot be run as written; the message names the offending key."""


def _check_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _number(section: str, value: Any, *, low: float | None = None, high: float | None = None, strict_low=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{section} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict_low else value < low):
        raise ConfigError(f"{section} must be {'>' if strict_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{section} must be <= {high}, got {value!r}")
    return value


def _int(section: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{section} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class FilterSpec:
    """One task-result filter run on a client before its update leaves the site.

    ``type`` is ``"percentile"`` (NVFlare ``PercentilePrivacy``), ``"svt"`` (NVFlare ``SVTPrivacy``), one of the
    project's filters (``"fail_closed_percentile"``, ``"sparse_percentile"``, ``"client_dp"``, from
    ``privacy.nvflare_filters``) or ``"class"`` (any NVFlare ``Filter`` by class path, with ``args``).
    ``sites`` limits it to some sites (default all), ``tasks`` to some tasks (default the training task).
    """

    type: str
    args: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    sites: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = ("train",)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str) -> FilterSpec:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where} must be an object, got {d!r}")
        kind = d.get("type")
        if kind not in FILTER_TYPES:
            raise ConfigError(f"{where}.type must be one of {list(FILTER_TYPES)}, got {kind!r}")
        meta = {"type", "sites", "tasks"}
        sites = d.get("sites")
        if sites is not None and (not isinstance(sites, list) or not all(isinstance(s, str) for s in sites)):
            raise ConfigError(f"{where}.sites must be a list of site names, got {sites!r}")
        tasks = d.get("tasks", ["train"])
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"{where}.tasks must be a non-empty list of task names, got {tasks!r}")
        if kind == "class":
            _check_keys(where, d, [*meta, "path", "args"])
            path = d.get("path")
            if not isinstance(path, str) or "." not in path:
                raise ConfigError(f"{where}.path must be a class path such as 'package.module.Class', got {path!r}")
            args = d.get("args", {})
            if not isinstance(args, Mapping):
                raise ConfigError(f"{where}.args must be an object, got {args!r}")
            return cls("class", dict(args), path, tuple(sites) if sites else None, tuple(tasks))
        args = {k: v for k, v in d.items() if k not in meta}
        if kind in PROJECT_FILTERS:  # arguments are checked by the filter's constructor when the job is built
            return cls(kind, args, PROJECT_FILTERS[kind], tuple(sites) if sites else None, tuple(tasks))
        if kind == "percentile":
            _check_keys(where, args, ["percentile", "gamma"])
            args.setdefault("percentile", 10)
            args.setdefault("gamma", 0.01)
            # NVFlare returns the update UNFILTERED for these values: refuse them instead.
            _number(f"{where}.percentile", args["percentile"], low=0, high=100, strict_low=True)
            if args["percentile"] >= 100:
                raise ConfigError(f"{where}.percentile must be < 100 (100 would share nothing), got 100")
            _number(f"{where}.gamma", args["gamma"], low=0, strict_low=True)
        else:  # svt
            allowed = ["fraction", "epsilon", "noise_var", "gamma", "tau", "replace", "epsilon_threshold",
                       "epsilon_query", "epsilon_release"]  # fmt: skip
            _check_keys(where, args, allowed)
            if args.get("epsilon_release") is None:
                # Without it NVFlare derives the release budget from noise_var times the number of uploaded
                # values, which at model scale means almost no noise: make the engineer choose.
                raise ConfigError(f"{where}.epsilon_release must be set explicitly for an SVT filter")
            for key in ("fraction", "epsilon", "noise_var", "gamma", "tau", "epsilon_threshold", "epsilon_query",
                        "epsilon_release"):  # fmt: skip
                if args.get(key) is not None:
                    _number(f"{where}.{key}", args[key], low=0, strict_low=key not in ("tau", "gamma"))
            if "fraction" in args and args["fraction"] > 1:
                raise ConfigError(f"{where}.fraction must be <= 1, got {args['fraction']}")
        return cls(kind, args, None, tuple(sites) if sites else None, tuple(tasks))

    @property
    def needs_sparse_decoder(self) -> bool:
        """True for the project's sparse percentile sharing, whose updates the server must decode first."""
        return self.path == PROJECT_FILTERS["sparse_percentile"]

    def applies_to(self, site: str) -> bool:
        return self.sites is None or site in self.sites

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.type == "class":
            d.update(path=self.path, args=dict(self.args))
        else:
            d.update(self.args)
        if self.sites is not None:
            d["sites"] = list(self.sites)
        d["tasks"] = list(self.tasks)
        return d


def _check_legacy_val_fraction(data: Mapping[str, Any]) -> None:
    """``data.val_fraction`` (before the job used the baselines' split) is accepted only where it means what the
    split now does: 0.25 held out per site, which is the test fraction of ``fetalseg.baseline.split_site``."""
    if "val_fraction" not in data:
        return
    from fetalseg.baseline import TEST_FRACTION, VAL_FRACTION

    value = data["val_fraction"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != TEST_FRACTION:
        raise ConfigError(
            f"data.val_fraction={value!r} is no longer used: every site is split like the centralized and "
            f"single-site baselines (fetalseg.baseline.split_site, seeded by data.split_seed): {TEST_FRACTION:g} "
            f"of a site's cases held out for testing, {VAL_FRACTION:g} of the rest for validation (model "
            f"selection), the others for training. Remove data.val_fraction ({TEST_FRACTION:g}, the old default, "
            "is still accepted: it is the same held-out fraction)"
        )


def _check_metrics_policy(metrics: Any) -> None:
    """``privacy.metrics``: how a DP-SGD site releases its metrics (``privacy.released_metrics.MetricsPolicy``)."""
    if metrics is None:
        return
    from privacy.released_metrics import MetricsPolicy

    try:
        MetricsPolicy.from_dict(metrics)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_dp_sgd(where: str, settings: Mapping[str, Any] | None, *, num_rounds: int, local_epochs: int) -> None:
    """DP-SGD settings as the sites will build them (the job's plan filled in as ``plan.dp_settings_for`` does):
    an unknown key or accountant, a bad δ, clip or EMA decay is an error here, before any site starts training.
    What only a site knows (δ against its N) is checked again there."""
    if settings is None:
        return
    from privacy.dp_config import DPSGDConfig  # torch-free: the check stays well under a second

    full = dict(settings)
    if not {"planned_steps", "planned_rounds"} & full.keys():
        full.update(planned_rounds=num_rounds, local_epochs=local_epochs)
    try:
        DPSGDConfig.from_dict(full)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_trained_parameters(spec: Any) -> str:
    """``training.trained_parameters``: the weights every site trains and sends (``fetalseg.subspace``), checked
    here so a typo stops the job before any site trains."""
    from fetalseg.subspace import PGRAD, validate_spec

    try:
        spec = validate_spec(spec)
    except ValueError as e:
        raise ConfigError(f"training.trained_parameters: {e}") from None
    if spec.startswith(PGRAD):
        # the basis file would have to travel to every site with the job; not wired yet: refuse, don't guess
        raise ConfigError(
            f"training.trained_parameters={spec!r}: pgrad needs its public gradient basis at every site, which a "
            "job cannot ship yet (use it in bench/bench_subspace.py); choose a group spec or lora:<r>"
        )
    return spec


def _check_local(local: Any, trained_parameters: str) -> tuple[str, int]:
    """``local``: the site-local part (``parameters``: structural groups never sent, FedBN-style; ``fine_tune_epochs``:
    passes over the site's training cases, without DP, that train only that part once the job's last update has been
    sent). A local group that is also sent would be both shared and private: refused here, before training."""
    from fetalseg.subspace import ALL, NONE, split_spec

    if local is None:
        return NONE, 0
    if not isinstance(local, Mapping):
        raise ConfigError(f"local must be an object such as {{'parameters': 'norm'}}, got {local!r}")
    _check_keys("local", local, ["parameters", "fine_tune_epochs"])
    spec = local.get("parameters", NONE)
    try:
        groups = split_spec(spec)
    except ValueError as e:
        raise ConfigError(f"local.parameters: {e}") from None
    spec = "+".join(groups)
    if groups == [ALL]:
        raise ConfigError("local.parameters='all' would leave nothing to federate; name groups such as 'norm'")
    epochs = _int("local.fine_tune_epochs", local.get("fine_tune_epochs", 0), low=0)
    if groups == [NONE]:
        if epochs:
            raise ConfigError("local.fine_tune_epochs needs local.parameters (the part the fine-tune trains)")
        return NONE, 0
    if ":" not in trained_parameters:  # group specs; lora/pgrad adapters live on convolution weights
        sent = set(split_spec(trained_parameters)) - {ALL}
        overlap = sorted(sent & set(groups))
        if overlap:
            raise ConfigError(
                f"local.parameters={spec!r} overlaps training.trained_parameters={trained_parameters!r} in {overlap}: "
                "a local group is never sent; remove it from one of them"
            )
    return spec, epochs


def _check_aggregation(agg: Any, *, n_sites: int, max_update_norm: float) -> tuple[str, float, float | None]:
    """``server.aggregation``: ``(method, trim_fraction, clip_update_norm)``; see the module docstring."""
    if agg is None:
        return "mean", 0.0, None
    if not isinstance(agg, Mapping):
        raise ConfigError(f"server.aggregation must be an object such as {{'method': 'median'}}, got {agg!r}")
    _check_keys("server.aggregation", agg, ["method", "trim_fraction", "clip_update_norm"])
    method = agg.get("method", "mean")
    if method not in AGGREGATION_METHODS:
        raise ConfigError(f"server.aggregation.method must be one of {list(AGGREGATION_METHODS)}, got {method!r}")
    trim = 0.0
    if method == "trimmed_mean":
        if "trim_fraction" not in agg:
            raise ConfigError("server.aggregation.trim_fraction must be set for trimmed_mean (e.g. 0.2)")
        trim = float(_number("server.aggregation.trim_fraction", agg["trim_fraction"], low=0))
        if trim >= 0.5:
            raise ConfigError(
                f"server.aggregation.trim_fraction must be < 0.5 (it is dropped at each end; at least one site must "
                f"remain), got {trim!r}"
            )
        from nvflare_jobs.robust_aggregation import trim_count

        k = trim_count(n_sites, trim)
        if k == 0:
            raise ConfigError(
                f"server.aggregation.trim_fraction={trim:g} trims floor({trim:g} x {n_sites}) = 0 sites per side at "
                f"the job's {n_sites} sites: that is the plain mean; use at least {math.ceil(1e4 / n_sites) / 1e4:g} "
                "(or median)"
            )
    elif "trim_fraction" in agg:
        raise ConfigError(f"server.aggregation.trim_fraction only applies to trimmed_mean (method is {method!r})")
    clip = agg.get("clip_update_norm")
    if clip is not None:
        clip = float(_number("server.aggregation.clip_update_norm", clip, low=0, strict_low=True))
        if clip >= max_update_norm:
            raise ConfigError(
                f"server.aggregation.clip_update_norm={clip:g} must be below server.max_update_norm="
                f"{max_update_norm:g}: the guard rejects every update above that, so this clip would never act"
            )
    return method, trim, clip


def _check_secure_aggregation(sa: Any, *, sites: Sequence[str], robust: bool, filters: Sequence[FilterSpec]):
    """``server.secure_aggregation``: ``(enabled, threshold, frac_bits)``; refused with anything that needs each
    site's update in the clear at the server."""
    if sa is None:
        return False, 0, 0
    if not isinstance(sa, Mapping):
        raise ConfigError(f"server.secure_aggregation must be an object such as {{'enabled': true}}, got {sa!r}")
    _check_keys("server.secure_aggregation", sa, ["enabled", "method", "threshold", "frac_bits"])
    enabled = sa.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"server.secure_aggregation.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return False, 0, 0
    from privacy.secure_aggregation.protocol import check_params

    threshold = sa.get("threshold", len(sites) // 2 + 1)
    frac_bits = sa.get("frac_bits", 16)
    try:
        check_params(sites, threshold, frac_bits)
    except ValueError as e:
        raise ConfigError(f"server.secure_aggregation: {e}") from None
    if robust:
        raise ConfigError(
            "server.secure_aggregation cannot be combined with server.aggregation (median, trimmed_mean or "
            "clip_update_norm): those need every site's update in the clear at the server"
        )
    if any(spec.needs_sparse_decoder for spec in filters):
        raise ConfigError(
            "server.secure_aggregation cannot be combined with sparse_percentile (the server decodes each site)"
        )
    return True, threshold, frac_bits


@dataclass(frozen=True)
class JobConfig:
    """A validated job config; build it with :func:`load_config` or :meth:`JobConfig.from_dict`."""

    raw: dict[str, Any]
    name: str
    algorithm: str
    fedprox_mu: float
    fedopt_optimizer: dict[str, Any]
    fedopt_lr_scheduler: dict[str, Any]
    num_rounds: int
    min_clients: int
    sites: tuple[str, ...]
    scope: str | None
    bundle_overrides: dict[str, Any]
    data_root: str | None
    split_seed: int
    local_epochs: int
    max_steps_per_epoch: int | None
    batch_size: int | None
    seed: int
    filters: tuple[FilterSpec, ...]
    dp_sgd: dict[str, Any] | None
    site_dp_sgd: dict[str, dict[str, Any] | None]
    max_update_norm: float
    straggler_wait_s: int
    task_timeout_s: int
    task_request_interval_s: float
    tracking: str | None
    cross_site_eval: bool
    external_process: bool
    torch_threads: int | None
    init_seed: int | None
    initial_checkpoint: str | None = None
    # what each site trains and sends (fetalseg.subspace spec: "all", "norm+bias+head", "lora:4", ...)
    trained_parameters: str = "all"
    # the site-local part (never sent): fetalseg.subspace groups, and non-DP fine-tune passes after the job
    local_parameters: str = "none"
    local_fine_tune_epochs: int = 0
    # server.aggregation (nvflare_jobs.robust_aggregation): how a round's DIFFs are combined
    aggregation_method: str = "mean"
    trim_fraction: float = 0.0
    clip_update_norm: float | None = None
    # server.secure_aggregation (nvflare_jobs.secure_aggregation): the server sees only the sum of the updates
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_frac_bits: int = 0
    secagg_method: str = "masking"  # or "he": NVFlare's homomorphic encryption (nvflare_jobs.secure_aggregation.he)

    @property
    def robust_aggregation(self) -> bool:
        """True when the job needs the robust aggregator (anything but the plain, unclipped FedAvg mean)."""
        return self.aggregation_method != "mean" or self.clip_update_norm is not None

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobConfig:
        d = copy.deepcopy(dict(d))
        top = ["name", "algorithm", "num_rounds", "min_clients", "sites", "scope", "bundle_overrides", "data",
               "training", "privacy", "server", "tracking", "cross_site_eval", "runtime", "description",
               "initial_checkpoint", "local"]  # fmt: skip
        _check_keys("config", d, top)

        name = d.get("name", "fetal_brain")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"name must be letters, digits, '-' or '_', got {name!r}")

        algo = d.get("algorithm", "fedavg")
        algo = {"name": algo} if isinstance(algo, str) else algo
        if not isinstance(algo, Mapping):
            raise ConfigError(f"algorithm must be a name or an object, got {algo!r}")
        _check_keys("algorithm", algo, ["name", "mu", "optimizer", "lr_scheduler"])
        algorithm = algo.get("name")
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm.name must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        if algorithm != "fedprox" and "mu" in algo:
            raise ConfigError("algorithm.mu only applies to fedprox")
        if algorithm != "fedopt" and ({"optimizer", "lr_scheduler"} & set(algo)):
            raise ConfigError("algorithm.optimizer / lr_scheduler only apply to fedopt")
        mu = float(_number("algorithm.mu", algo.get("mu", 0.01), low=0, strict_low=True))
        optimizer = dict(algo.get("optimizer") or {"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}})
        scheduler = dict(
            algo.get("lr_scheduler") or {"path": "torch.optim.lr_scheduler.ConstantLR", "args": {"factor": 1.0}}
        )
        for key, spec in (("optimizer", optimizer), ("lr_scheduler", scheduler)):
            _check_keys(f"algorithm.{key}", spec, ["path", "args"])
            if not isinstance(spec.get("path"), str):
                raise ConfigError(f"algorithm.{key}.path must be a class path, got {spec.get('path')!r}")

        num_rounds = _int("num_rounds", d.get("num_rounds", 5), low=1)
        sites = d.get("sites", ["site-1", "site-2", "site-3"])
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
            raise ConfigError(f"sites must be a non-empty list of site names, got {sites!r}")
        if len(set(sites)) != len(sites):
            raise ConfigError(f"sites has duplicates: {sites}")
        min_clients = _int("min_clients", d.get("min_clients", len(sites)), low=1)
        if min_clients > len(sites):
            raise ConfigError(f"min_clients={min_clients} exceeds the {len(sites)} configured sites")
        scope = d.get("scope")
        if scope is not None and (not isinstance(scope, str) or not scope):
            raise ConfigError(f"scope must be a privacy scope name or null, got {scope!r}")

        overrides = d.get("bundle_overrides", {})
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"bundle_overrides must be an object of bundle config ids, got {overrides!r}")

        data = d.get("data", {})
        _check_keys("data", data, ["root", "split_seed", "val_fraction"])
        root = data.get("root")
        if root is not None and not isinstance(root, str):
            raise ConfigError(f"data.root must be a path or null, got {root!r}")
        split_seed = _int("data.split_seed", data.get("split_seed", 0), low=0)
        _check_legacy_val_fraction(data)

        training = d.get("training", {})
        _check_keys(
            "training", training, ["local_epochs", "max_steps_per_epoch", "batch_size", "seed", "trained_parameters"]
        )
        trained_parameters = _check_trained_parameters(training.get("trained_parameters", "all"))
        local_parameters, local_fine_tune_epochs = _check_local(d.get("local"), trained_parameters)
        local_epochs = _int("training.local_epochs", training.get("local_epochs", 1), low=1)
        max_steps = training.get("max_steps_per_epoch")
        if max_steps is not None:
            _int("training.max_steps_per_epoch", max_steps, low=1)
        batch_size = training.get("batch_size")
        if batch_size is not None:
            _int("training.batch_size", batch_size, low=1)
        seed = _int("training.seed", training.get("seed", 0), low=0)

        privacy = d.get("privacy", {})
        _check_keys("privacy", privacy, ["filters", "dp_sgd", "sites", "metrics"])
        _check_metrics_policy(privacy.get("metrics"))
        raw_filters = privacy.get("filters", [])
        if not isinstance(raw_filters, list):
            raise ConfigError(f"privacy.filters must be a list, got {raw_filters!r}")
        filters = [FilterSpec.from_dict(f, where=f"privacy.filters[{i}]") for i, f in enumerate(raw_filters)]
        dp_sgd = privacy.get("dp_sgd")
        if dp_sgd is not None and not isinstance(dp_sgd, Mapping):
            raise ConfigError(f"privacy.dp_sgd must be an object of DP-SGD settings or null, got {dp_sgd!r}")
        site_dp: dict[str, dict[str, Any] | None] = {}
        per_site = privacy.get("sites", {})
        if not isinstance(per_site, Mapping):
            raise ConfigError(f"privacy.sites must map site names to settings, got {per_site!r}")
        for site, sd in per_site.items():
            where = f"privacy.sites.{site}"
            if site not in sites:
                raise ConfigError(f"{where}: {site!r} is not one of the job's sites {sites}")
            _check_keys(where, sd, ["filters", "dp_sgd"])
            for i, f in enumerate(sd.get("filters", [])):
                spec = FilterSpec.from_dict(f, where=f"{where}.filters[{i}]")
                if spec.sites is not None:
                    raise ConfigError(f"{where}.filters[{i}]: 'sites' is implied by the section")
                filters.append(FilterSpec(spec.type, spec.args, spec.path, (site,), spec.tasks))
            if "dp_sgd" in sd:
                if sd["dp_sgd"] is not None and not isinstance(sd["dp_sgd"], Mapping):
                    raise ConfigError(f"{where}.dp_sgd must be an object or null")
                site_dp[site] = dict(sd["dp_sgd"]) if sd["dp_sgd"] is not None else None
        for where, settings in [("privacy.dp_sgd", dp_sgd)] + [
            (f"privacy.sites.{k}.dp_sgd", v) for k, v in site_dp.items()
        ]:
            _check_dp_sgd(where, settings, num_rounds=num_rounds, local_epochs=local_epochs)
        for f in filters:
            for s in f.sites or ():
                if s not in sites:
                    raise ConfigError(f"a filter names site {s!r}, which is not one of the job's sites {sites}")

        server = d.get("server", {})
        _check_keys(
            "server",
            server,
            [
                "max_update_norm",
                "straggler_wait_s",
                "task_timeout_s",
                "task_request_interval_s",
                "aggregation",
                "secure_aggregation",
                "resume_on_restart",
            ],
        )
        if not isinstance(server.get("resume_on_restart", True), bool):  # read by nvflare_jobs.resume at restart
            raise ConfigError(f"server.resume_on_restart must be true or false, got {server['resume_on_restart']!r}")
        max_norm = float(
            _number("server.max_update_norm", server.get("max_update_norm", 1.0e3), low=0, strict_low=True)
        )
        aggregation_method, trim_fraction, clip_update_norm = _check_aggregation(
            server.get("aggregation"), n_sites=len(sites), max_update_norm=max_norm
        )
        secure_aggregation, secagg_threshold, secagg_frac_bits = _check_secure_aggregation(
            server.get("secure_aggregation"),
            sites=sites,
            robust=aggregation_method != "mean" or clip_update_norm is not None,
            filters=filters,
        )
        straggler = _int("server.straggler_wait_s", server.get("straggler_wait_s", 60), low=0)
        task_timeout = _int("server.task_timeout_s", server.get("task_timeout_s", 0), low=0)
        # how long a site waits after a task before asking for the next one (NVFlare's default, 2 s, is idle time
        # added to every round; a few hospitals polling twice a second cost the server nothing)
        request_interval = float(
            _number(
                "server.task_request_interval_s",
                server.get("task_request_interval_s", DEFAULT_TASK_REQUEST_INTERVAL_S),
                low=0,
                high=60,
                strict_low=True,
            )
        )

        tracking = d.get("tracking", "tensorboard")
        if tracking not in TRACKERS:
            raise ConfigError(f"tracking must be one of {list(TRACKERS)}, got {tracking!r}")
        cse = d.get("cross_site_eval", True)
        if not isinstance(cse, bool):
            raise ConfigError(f"cross_site_eval must be true or false, got {cse!r}")

        runtime = d.get("runtime", {})
        _check_keys("runtime", runtime, ["external_process", "torch_threads", "init_seed"])
        external = runtime.get("external_process", True)
        if not isinstance(external, bool):
            raise ConfigError(f"runtime.external_process must be true or false, got {external!r}")
        threads = runtime.get("torch_threads")
        if threads is not None:
            _int("runtime.torch_threads", threads, low=1)
        init_seed = runtime.get("init_seed", 0)
        if init_seed is not None:
            _int("runtime.init_seed", init_seed, low=0)

        # A bundle checkpoint (e.g. pretrained on public data) the global model starts from instead of fresh
        # weights. Only its type is checked here: the file is read where the job is built (export / simulation),
        # and a site parsing the exported config never needs it.
        initial_checkpoint = d.get("initial_checkpoint")
        if initial_checkpoint is not None and (not isinstance(initial_checkpoint, str) or not initial_checkpoint):
            raise ConfigError(
                f"initial_checkpoint must be a path to a bundle checkpoint or null, got {initial_checkpoint!r}"
            )

        from nvflare_jobs.secure_aggregation.distributed import check_distributed_dp

        check_distributed_dp(  # privacy.dp_sgd.distributed: each site adds σ/√t of the sum's noise
            d, secure_aggregation=secure_aggregation, local_epochs=local_epochs, local_parameters=local_parameters
        )
        if algorithm == "fedprox" and (dp_sgd is not None or any(v is not None for v in site_dp.values())):
            # Opacus computes per-sample gradients of the data loss only; the proximal term's gradient would be
            # dropped from the private update, so the combination is refused rather than silently changed.
            raise ConfigError("fedprox cannot be combined with privacy.dp_sgd (the proximal term is not per-sample)")

        from nvflare_jobs.secure_aggregation.he import check_he_config

        secagg_method, he_threshold = check_he_config(
            server.get("secure_aggregation") if secure_aggregation else None,
            algorithm=algorithm,
            cross_site_eval=cse,
            local_fine_tune_epochs=local_fine_tune_epochs,
        )
        secagg_threshold = he_threshold if secagg_method == "he" else secagg_threshold
        return cls(
            raw=d,
            name=name,
            algorithm=algorithm,
            fedprox_mu=mu,
            fedopt_optimizer=optimizer,
            fedopt_lr_scheduler=scheduler,
            num_rounds=num_rounds,
            min_clients=min_clients,
            sites=tuple(sites),
            scope=scope,
            bundle_overrides=dict(overrides),
            data_root=root,
            split_seed=split_seed,
            local_epochs=local_epochs,
            max_steps_per_epoch=max_steps,
            batch_size=batch_size,
            seed=seed,
            filters=tuple(filters),
            dp_sgd=dict(dp_sgd) if dp_sgd is not None else None,
            site_dp_sgd=site_dp,
            max_update_norm=max_norm,
            straggler_wait_s=straggler,
            task_timeout_s=task_timeout,
            task_request_interval_s=request_interval,
            tracking=tracking,
            cross_site_eval=cse,
            external_process=external,
            torch_threads=threads,
            init_seed=init_seed,
            initial_checkpoint=initial_checkpoint,
            trained_parameters=trained_parameters,
            local_parameters=local_parameters,
            local_fine_tune_epochs=local_fine_tune_epochs,
            aggregation_method=aggregation_method,
            trim_fraction=trim_fraction,
            clip_update_norm=clip_update_norm,
            secure_aggregation=secure_aggregation,
            secagg_threshold=secagg_threshold,
            secagg_frac_bits=secagg_frac_bits,
            secagg_method=secagg_method,
        )

    # ------------------------------------------------------------------------------------------------------
    def dp_sgd_for(self, site: str) -> dict[str, Any] | None:
        """DP-SGD settings that apply at ``site`` (its own section replaces the job-wide one), or None."""
        if site in self.site_dp_sgd:
            return self.site_dp_sgd[site]
        return self.dp_sgd

    def filters_for(self, site: str) -> list[FilterSpec]:
        return [f for f in self.filters if f.applies_to(site)]

    def with_changes(self, **changes: Any) -> JobConfig:
        """A copy with top-level keys replaced (dicts are merged one level deep), validated again."""
        d = copy.deepcopy(self.raw)
        for key, value in changes.items():
            if isinstance(value, Mapping) and isinstance(d.get(key), Mapping):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return JobConfig.from_dict(d)

    def to_json(self) -> str:
        return json.dumps(self.raw, indent=2, sort_keys=False)


def load_config(source: str | Path | Mapping[str, Any]) -> JobConfig:
    """Read a job config from a JSON/YAML file (or take a dict) and validate it."""
    if isinstance(source, Mapping):
        return JobConfig.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"job config {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be an object")
    try:
        return JobConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def resolve_site_data(config: JobConfig, site: str, *, environ: Mapping[str, str] | None = None) -> Path:
    """Where ``site`` finds its cases: ``$FETAL_FL_SITE_DATA``, else ``<$FETAL_FL_DATA_ROOT or data.root>/<site>``.

    A hospital sets ``FETAL_FL_SITE_DATA`` once in its client's environment and never edits job configs; the job
    config's ``data.root`` is for simulations where all sites share one machine (:func:`site_data_dir`).
    """
    try:
        return site_data_dir(site, config.data_root, environ=environ)
    except SiteDataError as e:
        raise ConfigError(str(e)) from None
