"""Differentially private dataset statistics of one site: the mechanisms, their sensitivities and their accounting.

Why: before a training job, the ML engineer and the site admins want to see how the sites differ (case counts,
gestational age, voxel size, orientation, intensity distributions). Every such number is computed from the site's
patients and is a release, exactly like a model update: it is noised here with the Gaussian mechanism, accounted
with the same accountants as DP-SGD (:mod:`privacy.accounting`) and charged to the same site ledger
(:mod:`privacy.ledger`), so statistics and training spend ONE budget per dataset. Tested without NVFlare; the
NVFlare job (:mod:`nvflare_jobs.statistics`) is a thin adapter around :class:`SiteStatisticsRelease`.

Privacy unit: one patient (one case), add/remove adjacency (as Opacus's accountants). Each patient contributes one
bounded record per feature:

* a scalar value clipped to the feature's public range ``[low, high]`` (GA in weeks, voxel size in mm, the case's
  mean intensity), or nothing when the value is missing (GA not recorded);
* for the histogram, either the one-hot bin of that value, or — for a voxel-level feature such as intensity — the
  patient's own voxel histogram normalised to sum 1 (a patient with more voxels does not weigh more).

L2 sensitivities of one release (one statistic of one feature), adding or removing one patient:

* count: 1 (one count of all cases is shared by the features every case has; a feature that can be missing gets
  its own count);
* sum, released centred, Σ(x − c) with c the range midpoint: (high − low) / 2. The NVFlare sum is then
  c·ñ + Σ̃(x − c) and the mean c + Σ̃(x − c)/ñ: post-processing of two releases, free;
* squared deviations from the (already released, noised) global mean m, Σ(x − m)² with m clipped to the range:
  (high − low)²;
* histogram (the whole bin vector): 1 (a one-hot row has L2 norm 1; a normalised distribution at most 1).

Every release is a Gaussian mechanism with noise std σ·Δ, noise multiplier σ: k releases compose in the
accountant as the history ``[(σ, 1.0, k)]`` (sample rate 1: no subsampling). σ is either given or solved from a
target ε for the planned k, which depends only on the request, never on the data. Nothing else about the data
leaves: min and max are never computed (histogram ranges are public, from the request); quantiles are refused.
Values are clipped before anything is summed; a value outside the range is clipped, never dropped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    check_accountant,
    check_delta,
    epsilon_for_history,
    noise_multiplier_for_epsilon,
)

log = logging.getLogger(__name__)

# NVFlare's statistic names a request may ask for; count is always released (NVFlare always asks for it).
ALLOWED_STATISTICS = ("count", "sum", "mean", "stddev", "histogram")
REFUSED_STATISTICS = {
    "min": "min and max are never released: histogram ranges come from the request (public), not from the data",
    "max": "min and max are never released: histogram ranges come from the request (public), not from the data",
    "quantile": "quantiles have no bounded-sensitivity mechanism here: ask for a histogram",
}
FEATURE_KINDS = ("value", "category", "distribution")
STAGE_1, STAGE_2 = 1, 2  # NVFlare's two statistics tasks: count/sum/mean, then histogram/variance/stddev
MECHANISM = (
    "Gaussian mechanism per released statistic (count Δ=1, centred sum Δ=(high−low)/2, squared deviations "
    "Δ=(high−low)², histogram Δ=1), one patient = the privacy unit (add/remove), values clipped to public ranges"
)


class StatisticsRequestError(ValueError):
    """A statistics request that cannot be released safely (refused before anything is computed)."""


@functools.lru_cache(maxsize=64)
def _sigma_for(target_epsilon: float, releases: int, delta: float, accountant: str) -> float:
    """σ for ``releases`` Gaussian releases at a target ε (the search takes seconds with PRV: asked once per plan)."""
    return noise_multiplier_for_epsilon(
        target_epsilon=target_epsilon,
        sample_rate=1.0,
        steps=releases,
        delta=delta,
        accountant=accountant,  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=256)
def _epsilon_for(sigma: float, releases: int, delta: float, accountant: str) -> float:
    """ε of ``releases`` Gaussian releases at noise multiplier σ (the accountant takes a while with PRV)."""
    return epsilon_for_history([(sigma, 1.0, releases)], delta=delta, accountant=accountant)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the request: its public range, histogram bins and kind.

    ``kind``: ``value`` (one scalar per patient), ``category`` (a category index per patient: only count and
    histogram mean something; sum/mean/stddev are reported as the range midpoint and 0, no release), or
    ``distribution`` (a voxel-level feature: the histogram is each patient's normalised voxel histogram, the scalar
    is the patient's mean). ``optional``: the value can be missing for a patient (its own count is released).
    """

    name: str
    low: float
    high: float
    bins: int
    kind: str = "value"
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise StatisticsRequestError(f"feature name must be a non-empty string, got {self.name!r}")
        for key, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise StatisticsRequestError(f"feature {self.name!r}: {key} must be a finite number, got {v!r}")
        if not self.high > self.low:
            raise StatisticsRequestError(
                f"feature {self.name!r}: range must have high > low, got [{self.low}, {self.high}]"
            )
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not 1 <= self.bins <= 1000:
            raise StatisticsRequestError(
                f"feature {self.name!r}: bins must be an integer in 1..1000, got {self.bins!r}"
            )
        if self.kind not in FEATURE_KINDS:
            raise StatisticsRequestError(
                f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}"
            )

    @property
    def center(self) -> float:
        return (self.low + self.high) / 2.0

    @property
    def has_moments(self) -> bool:
        return self.kind != "category"

    def bin_edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "range": [self.low, self.high],
            "bins": self.bins,
            "kind": self.kind,
            "optional": self.optional,
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> FeatureSpec:
        if not isinstance(d, Mapping):
            raise StatisticsRequestError(f"feature {name!r} must be an object, got {d!r}")
        unknown = sorted(set(d) - {"range", "bins", "kind", "optional"})
        if unknown:
            raise StatisticsRequestError(f"feature {name!r}: unknown key(s) {unknown}")
        rng = d.get("range")
        if not isinstance(rng, Sequence) or isinstance(rng, str) or len(rng) != 2:
            raise StatisticsRequestError(
                f"feature {name!r}: 'range' [low, high] is required (public bounds: every value is clipped to "
                f"them, and they set the histogram range, so no min/max of the data is ever released)"
            )
        return cls(
            name=name,
            low=rng[0],
            high=rng[1],
            bins=d.get("bins", 10),
            kind=d.get("kind", "value"),
            optional=bool(d.get("optional", False)),
        )


@dataclass(frozen=True)
class StatisticsRequest:
    """What a statistics job asks every site for, and at what privacy: validated, data-independent.

    Exactly one of ``epsilon`` (target for the whole request at ``delta``; σ is solved for it) and
    ``noise_multiplier`` (σ given; ε follows). ``seed``: reproducible noise, for tests only (a known seed voids the
    guarantee; logged as such).
    """

    statistics: tuple[str, ...]
    features: tuple[FeatureSpec, ...]
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    accountant: str = DEFAULT_ACCOUNTANT
    seed: int | None = None
    _sigma: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stats = tuple(dict.fromkeys(self.statistics))
        for s in stats:
            if s in REFUSED_STATISTICS:
                raise StatisticsRequestError(f"statistic {s!r} is refused: {REFUSED_STATISTICS[s]}")
            if s not in ALLOWED_STATISTICS:
                raise StatisticsRequestError(f"unknown statistic {s!r}; allowed: {list(ALLOWED_STATISTICS)}")
        # count always (NVFlare asks for it); stddev needs the global mean, the mean needs the sum (NVFlare's server
        # computes the global mean from the sites' sums and counts)
        needed = {"count"} | set(stats) | ({"mean"} if "stddev" in stats else set())
        needed |= {"sum"} if needed & {"mean", "stddev"} else set()
        object.__setattr__(self, "statistics", tuple(s for s in ALLOWED_STATISTICS if s in needed))
        if not self.features:
            raise StatisticsRequestError("a statistics request needs at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise StatisticsRequestError(f"feature names must be unique, got {names}")
        check_delta(self.delta)
        check_accountant(self.accountant)
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise StatisticsRequestError(
                "give exactly one of privacy.epsilon (a target for the whole request) and privacy.noise_multiplier"
            )
        for key, v in (("epsilon", self.epsilon), ("noise_multiplier", self.noise_multiplier)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            ):
                raise StatisticsRequestError(f"privacy.{key} must be a finite number > 0, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise StatisticsRequestError(f"privacy.seed must be an integer or null, got {self.seed!r}")
        if self.noise_multiplier is not None:
            sigma = float(self.noise_multiplier)
        else:
            try:
                sigma = _sigma_for(float(self.epsilon), self.planned_releases(), float(self.delta), self.accountant)  # type: ignore[arg-type]
            except ValueError as e:
                raise StatisticsRequestError(str(e)) from e
        object.__setattr__(self, "_sigma", sigma)

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StatisticsRequest:
        """From ``{"statistics": [...], "features": {name: {...}}, "privacy": {...}}`` (unknown keys are errors)."""
        if not isinstance(d, Mapping):
            raise StatisticsRequestError(f"a statistics request must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"statistics", "features", "privacy"})
        if unknown:
            raise StatisticsRequestError(f"unknown key(s) {unknown} in the statistics request")
        stats = d.get("statistics", ["count"])
        if not isinstance(stats, Sequence) or isinstance(stats, str):
            raise StatisticsRequestError(f"'statistics' must be a list of names, got {stats!r}")
        feats = d.get("features")
        if not isinstance(feats, Mapping) or not feats:
            raise StatisticsRequestError("'features' must be a non-empty object {name: {range, bins, ...}}")
        priv = d.get("privacy")
        if not isinstance(priv, Mapping):
            raise StatisticsRequestError(
                "'privacy' is required: {epsilon or noise_multiplier, delta, accountant}; statistics never leave a "
                "site un-noised"
            )
        unknown = sorted(set(priv) - {"epsilon", "noise_multiplier", "delta", "accountant", "seed"})
        if unknown:
            raise StatisticsRequestError(f"privacy: unknown key(s) {unknown}")
        return cls(
            statistics=tuple(stats),
            features=tuple(FeatureSpec.from_dict(n, f) for n, f in feats.items()),
            epsilon=priv.get("epsilon"),
            noise_multiplier=priv.get("noise_multiplier"),
            delta=priv.get("delta", DEFAULT_DELTA),
            accountant=priv.get("accountant", DEFAULT_ACCOUNTANT),
            seed=priv.get("seed"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistics": list(self.statistics),
            "features": {f.name: f.to_dict() for f in self.features},
            "privacy": {
                "epsilon": self.epsilon,
                "noise_multiplier": self.noise_multiplier,
                "delta": self.delta,
                "accountant": self.accountant,
                "seed": self.seed,
            },
        }

    # -- the plan --------------------------------------------------------------------------------------------------
    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"feature {name!r} is not in the request ({[f.name for f in self.features]})")

    @property
    def wants_sum(self) -> bool:
        return bool({"sum", "mean", "stddev"} & set(self.statistics))

    def releases(self, stage: int) -> list[tuple[str, str]]:
        """The (statistic, feature) Gaussian releases of ``stage`` (data-independent: what is planned and charged).

        Stage 1: one count of all cases (``count`` / ``*``), one count per optional feature, the centred sum of
        each non-category feature (if sum, mean or stddev is asked). Stage 2: the histogram of each feature, the
        squared deviations of each non-category feature (if stddev is asked).
        """
        out: list[tuple[str, str]] = []
        if stage == STAGE_1:
            out.append(("count", "*"))
            out += [("count", f.name) for f in self.features if f.optional]
            if self.wants_sum:
                out += [("sum", f.name) for f in self.features if f.has_moments]
        elif stage == STAGE_2:
            if "histogram" in self.statistics:
                out += [("histogram", f.name) for f in self.features]
            if "stddev" in self.statistics:
                out += [("var", f.name) for f in self.features if f.has_moments]
        else:
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        return out

    def planned_releases(self, through_stage: int = STAGE_2) -> int:
        return sum(len(self.releases(s)) for s in range(STAGE_1, through_stage + 1))

    @property
    def sigma(self) -> float:
        """The noise multiplier of every release (noise std ÷ L2 sensitivity)."""
        return self._sigma

    def epsilon_through(self, stage: int) -> float:
        """ε (at ``delta``) of every release up to and including ``stage``, composed in the accountant."""
        return _epsilon_for(self.sigma, self.planned_releases(stage), float(self.delta), self.accountant)

    @property
    def planned_epsilon(self) -> float:
        return self.epsilon_through(STAGE_2)

    def sensitivity(self, statistic: str, feature: str) -> float:
        """L2 sensitivity of one release (add/remove one patient); see the module docstring."""
        if statistic in ("count", "histogram"):
            return 1.0
        spec = self.feature(feature)
        width = spec.high - spec.low
        if statistic == "sum":
            return width / 2.0
        if statistic == "var":
            return width**2
        raise ValueError(f"no release named {statistic!r}")

    def noise_std(self, statistic: str, feature: str) -> float:
        return self.sigma * self.sensitivity(statistic, feature)

    def describe(self) -> str:
        return (
            f"{self.planned_releases()} Gaussian releases at noise multiplier σ={self.sigma:.4g}: "
            f"ε={self.planned_epsilon:.4g} at δ={self.delta:g} ({self.accountant}), one patient = the privacy unit"
        )


@dataclass
class PatientRecords:
    """Each patient's bounded contribution, per feature (built at the site from its cases).

    ``values[name]``: n floats (NaN: missing for that patient). ``distributions[name]``: n × bins rows, each the
    patient's own voxel histogram (normalised here to sum 1) for ``distribution`` features.
    """

    n_patients: int
    values: dict[str, np.ndarray]
    distributions: dict[str, np.ndarray] = field(default_factory=dict)

    def check(self, request: StatisticsRequest) -> None:
        for spec in request.features:
            v = self.values.get(spec.name)
            if v is None or np.asarray(v).shape != (self.n_patients,):
                raise StatisticsRequestError(f"feature {spec.name!r}: need one value per patient ({self.n_patients})")
            missing = int(np.isnan(np.asarray(v, dtype=float)).sum())
            if missing and not spec.optional:
                raise StatisticsRequestError(
                    f"feature {spec.name!r}: {missing} patient(s) have no value but the feature is not optional "
                    "(its count is the shared case count); mark it optional"
                )
            if spec.kind == "distribution":
                d = self.distributions.get(spec.name)
                if d is None or np.asarray(d).shape != (self.n_patients, spec.bins):
                    raise StatisticsRequestError(
                        f"feature {spec.name!r}: need a {self.n_patients} × {spec.bins} per-patient histogram"
                    )


def patient_histogram(voxels: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """One patient's voxel histogram over the feature's public range (values clipped into it), normalised to sum 1."""
    v = np.asarray(voxels, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise StatisticsRequestError(f"feature {spec.name!r}: a patient has no finite voxel")
    counts, _ = np.histogram(np.clip(v, spec.low, spec.high), bins=spec.bin_edges())
    return counts / counts.sum()


class SiteStatisticsRelease:
    """The noised statistics of one site: each release computed once (cached), accounted, charged before it leaves.

    Use: :meth:`reserve` the request's planned ε on the site ledger (refused when over budget: nothing charged,
    nothing computed), then ask for values; the first value of a stage charges the ledger with the cumulative ε
    through that stage (one spend record per stage, written and fsync'ed before the value is returned), then
    :meth:`finish` releases the reservation. Without a ledger the ε is only reported.
    """

    def __init__(
        self,
        request: StatisticsRequest,
        records: PatientRecords,
        *,
        rng: np.random.Generator | None = None,
    ) -> None:
        records.check(request)
        self.request = request
        self.records = records
        if rng is None:
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
            if request.seed is not None:
                log.warning("statistics noise is seeded (seed=%d): reproducible, so NOT private", request.seed)
            rng = np.random.default_rng(seed)
        self._rng = rng
        self._cache: dict[tuple[str, str], Any] = {}
        self.released: list[tuple[str, str]] = []  # in release order
        self._ledger: Any = None
        self._dataset_id = ""
        self._job_id = ""
        self.charged_stages: list[int] = []

    # -- ledger ----------------------------------------------------------------------------------------------------
    def reserve(self, ledger: Any, *, dataset_id: str, job_id: str) -> None:
        """Hold the request's planned ε on ``dataset_id`` (raises PrivacyBudgetExceeded, writing nothing, if over)."""
        ledger.reserve(
            job_id=job_id,
            dataset_id=dataset_id,
            epsilon=self.request.planned_epsilon,
            delta=self.request.delta,
            kind="statistics",
            releases=self.request.planned_releases(),
            noise_multiplier=self.request.sigma,
            accountant=self.request.accountant,
        )
        self._ledger, self._dataset_id, self._job_id = ledger, dataset_id, job_id

    def finish(self) -> float:
        """Release the reservation (what was charged stays); the unspent ε given back."""
        if self._ledger is None:
            return 0.0
        return float(self._ledger.release(job_id=self._job_id, dataset_id=self._dataset_id, missing_ok=True))

    def _charge(self, stage: int) -> None:
        if stage in self.charged_stages:
            return
        if self._ledger is None:
            log.info("statistics stage %d released without a site ledger: its ε is reported, not charged", stage)
        if self._ledger is not None:
            self._ledger.record(
                job_id=self._job_id,
                dataset_id=self._dataset_id,
                epsilon=self.request.epsilon_through(stage),
                delta=self.request.delta,
                round=stage - 1,
                kind="statistics",
                releases=self.request.planned_releases(stage),
                noise_multiplier=self.request.sigma,
                accountant=self.request.accountant,
            )
        self.charged_stages.append(stage)

    def epsilon_through(self, stage: int) -> float:
        return self.request.epsilon_through(stage)

    @property
    def epsilon(self) -> float:
        """ε charged so far (0 before the first release)."""
        return self.request.epsilon_through(max(self.charged_stages)) if self.charged_stages else 0.0

    # -- the releases ----------------------------------------------------------------------------------------------
    def _release(self, statistic: str, feature: str, stage: int, true_value: Any) -> Any:
        key = (statistic, feature)
        if key not in self._cache:
            if key not in self.request.releases(stage):
                raise StatisticsRequestError(f"{statistic} of {feature!r} is not part of the request's plan")
            self._charge(stage)  # on disk before any value of this stage is returned
            std = self.request.noise_std(statistic, feature)
            true = np.asarray(true_value, dtype=np.float64)
            self._cache[key] = true + self._rng.normal(0.0, std, size=true.shape)
            self.released.append(key)
        return self._cache[key]

    def _values(self, feature: str) -> np.ndarray:
        spec = self.request.feature(feature)
        v = np.asarray(self.records.values[feature], dtype=np.float64)
        return np.clip(v[~np.isnan(v)], spec.low, spec.high)

    def count(self, feature: str) -> float:
        """Noised number of patients with a value of ``feature`` (never below 0: post-processing)."""
        spec = self.request.feature(feature)
        if spec.optional:
            true = float(len(self._values(feature)))
            return max(float(self._release("count", feature, STAGE_1, true)), 0.0)
        return max(float(self._release("count", "*", STAGE_1, float(self.records.n_patients))), 0.0)

    def sum(self, feature: str) -> float:
        """c·ñ + noised Σ(x − c): the sum NVFlare adds up across sites (a category: c·ñ, no release)."""
        spec = self.request.feature(feature)
        n = self.count(feature)
        if not spec.has_moments:
            return spec.center * n
        centred = float(self._release("sum", feature, STAGE_1, float((self._values(feature) - spec.center).sum())))
        return spec.center * n + centred

    def mean(self, feature: str) -> float:
        """Post-processing: sum ÷ count, clipped to the range (count floored at 1)."""
        spec = self.request.feature(feature)
        return float(np.clip(self.sum(feature) / max(self.count(feature), 1.0), spec.low, spec.high))

    def histogram(self, feature: str) -> list[float]:
        """Noised per-bin patient counts over the public range (negative bins floored at 0: post-processing)."""
        spec = self.request.feature(feature)
        if spec.kind == "distribution":
            rows = np.asarray(self.records.distributions[feature], dtype=np.float64)
            rows = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-300)  # each patient weighs 1
            rows = rows[~np.isnan(np.asarray(self.records.values[feature], dtype=float))]
            true = rows.sum(axis=0)
        else:
            true, _ = np.histogram(self._values(feature), bins=spec.bin_edges())
        noised = self._release("histogram", feature, STAGE_2, true.astype(np.float64))
        return [float(max(v, 0.0)) for v in noised]

    def squared_deviations(self, feature: str, global_mean: float) -> float:
        """Noised Σ(x − m)² around the (released) global mean m, m clipped to the range (a category: 0)."""
        spec = self.request.feature(feature)
        if not spec.has_moments:
            return 0.0
        m = float(np.clip(float(global_mean), spec.low, spec.high))
        true = float(((self._values(feature) - m) ** 2).sum())
        return max(float(self._release("var", feature, STAGE_2, true)), 0.0)

    def released_value(self, statistic: str, feature: str) -> Any:
        """The noised value of a release already made (KeyError if it was not made)."""
        return self._cache[(statistic, feature)]

    def report(self) -> dict[str, Any]:
        """What the site released and what it cost (no data: the request, σ, ε, the releases made)."""
        return {
            "mechanism": MECHANISM,
            "noise_multiplier": self.request.sigma,
            "delta": self.request.delta,
            "accountant": self.request.accountant,
            "planned_releases": self.request.planned_releases(),
            "planned_epsilon": self.request.planned_epsilon,
            "released": [f"{s}:{f}" for s, f in self.released],
            "epsilon": self.epsilon,
            "ledger": {"dataset_id": self._dataset_id, "job_id": self._job_id} if self._ledger is not None else None,
        }


def expected_abs_error(std: float) -> float:
    """E|N(0, std²)| = std·√(2/π): what a reader should expect between a noised and the true value."""
    return float(std) * math.sqrt(2.0 / math.pi)


def check_request_names(names: Iterable[str]) -> None:
    """Refuse unknown or refused statistic names (what NVFlare's controller config may carry)."""
    for n in names:
        if n in REFUSED_STATISTICS:
            raise StatisticsRequestError(f"statistic {n!r} is refused: {REFUSED_STATISTICS[n]}")
        if n not in ALLOWED_STATISTICS:
            raise StatisticsRequestError(f"unknown statistic {n!r}; allowed: {list(ALLOWED_STATISTICS)}")
