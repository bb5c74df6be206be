"""What a DP-SGD site may say about its data besides its weights: metrics, noised and accounted, or nothing.

Why: DP-SGD's ε covers the weight differences a site sends. Every other value computed from the site's cases
(validation Dice, losses, HD95) is a release too; sent as it is, it is not covered by any ε. With DP on, every
metrics dict a site sends (per round, the TensorBoard stream, cross-site evaluation) goes through
:meth:`SiteMetricsRelease.release`, which keeps only

* values that do not depend on the cases' contents (case and step counts: they follow from N, which ε does not
  cover either; the accountant's own ε and δ), and
* per-tissue Dice and their mean, noised with a Gaussian mechanism whose releases are composed with DP-SGD's steps
  in ONE accountant history (Opacus's RDP or PRV take heterogeneous ``(σ, q, steps)`` triples; a Gaussian release
  is ``(σ, 1.0, 1)``), so the ledger records one ε for everything that left the site.

Everything else (training loss, HD95, un-noised Dice) is withheld. Without DP nothing changes.

Sensitivity: Dice is in [0, 1] (a tissue absent from both prediction and truth scores 1: they agree); the mean of
n cases moves by at most 1/n when one case is replaced, added or removed (|x − mean| / n' ≤ 1/n for the n cases
of the released set), so the vector of the k = 7 tissue means has L2 sensitivity √k / n. A loss must be clipped to
a bound first (:func:`bounded_mean`); it is not released by the job. The split into training / validation / test
cases is taken as fixed, as DP-SGD's accounting does; releases on disjoint case sets are still composed
sequentially (an upper bound: no parallel-composition discount is claimed).

The noise multiplier of the metrics is ``privacy.metrics.noise_multiplier`` of the job config; without it (the
default) nothing data-dependent but the weights leaves a DP site and the server keeps the last round's model
(docs/privacy.md, "Metrics").
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fetalseg.plumbing import atomic_write_json

log = logging.getLogger(__name__)

# Keys whose values follow from the number of cases, the plan or the accountant, never from the cases' contents.
DATA_INDEPENDENT_KEYS = frozenset({"train_steps", "dp_epsilon", "dp_delta", "dp_metrics_epsilon"})
DATA_INDEPENDENT_SUFFIXES = ("_cases",)
# How many releases a job plans for its metrics: one validation per round, and in the cross-site evaluation the
# validation and test cases of each server model scored (the final and the best global model).
EVALUATED_MODELS = 2
MECHANISM = (
    "Gaussian mechanism on the per-tissue mean Dice (clipped to [0, 1], L2 sensitivity √7/n for n cases), "
    "composed with DP-SGD's steps in the same accountant; the mean Dice is computed from the noised values"
)


class _Engine(Protocol):  # what is read from privacy.dpsgd.SitePrivacyEngine
    noise_multiplier: float
    sample_rate: float
    planned_steps: int | None

    @property
    def history(self) -> list[tuple[float, float, int]]: ...

    @property
    def epsilon(self) -> float: ...

    @property
    def planned_epsilon(self) -> float | None: ...

    @property
    def steps(self) -> int: ...

    def report(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MetricsPolicy:
    """How a DP site releases its metrics (job config ``privacy.metrics``).

    ``noise_multiplier``: noise std ÷ L2 sensitivity of the Gaussian mechanism; None withholds every data-dependent
    metric (costs no ε). ``seed``: reproducible noise for tests only (a known seed voids the guarantee).
    """

    noise_multiplier: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        s = self.noise_multiplier
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            raise ValueError(f"privacy.metrics.noise_multiplier must be a finite number > 0 or null, got {s!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"privacy.metrics.seed must be an integer or null, got {self.seed!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> MetricsPolicy:
        """From the job config's ``privacy.metrics`` (None: the default); unknown keys are an error."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"privacy.metrics must be an object or null, got {d!r}")
        unknown = sorted(set(d) - {"noise_multiplier", "seed"})
        if unknown:
            raise ValueError(f"privacy.metrics: unknown key(s) {unknown}; allowed: ['noise_multiplier', 'seed']")
        return cls(noise_multiplier=d.get("noise_multiplier"), seed=d.get("seed"))


def planned_releases(*, num_rounds: int, cross_site_eval: bool) -> int:
    """Gaussian releases a job may make: one per round, plus validation and test for each evaluated model."""
    return int(num_rounds) + (2 * EVALUATED_MODELS if cross_site_eval else 0)


def is_data_independent(key: str) -> bool:
    return key in DATA_INDEPENDENT_KEYS or key.endswith(DATA_INDEPENDENT_SUFFIXES)


def bounded_mean(values: Any, *, low: float, high: float) -> tuple[np.ndarray, float]:
    """Mean over cases (axis 0) of ``values`` clipped to [low, high], and its L2 sensitivity (high − low)·√k / n.

    ``values`` is n × k (or n); NaN is refused: the caller decides what a missing value means, before clipping.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"values must be a non-empty n × k array, got shape {arr.shape}")
    if not high > low:
        raise ValueError(f"high must be > low, got [{low}, {high}]")
    if np.isnan(arr).any():
        raise ValueError("values contain NaN: map missing values to a bounded value first")
    clipped = np.clip(arr, low, high)
    n, k = clipped.shape
    return clipped.mean(axis=0), (high - low) * math.sqrt(k) / n


def per_case_dice(scores: Sequence[Any], tissues: Sequence[str]) -> np.ndarray:
    """n × k Dice of each case and tissue; a tissue absent from prediction and truth (NaN) counts as 1."""
    rows = []
    for s in scores:
        row = [float(s.dice.get(t, float("nan"))) for t in tissues]
        rows.append([1.0 if math.isnan(v) else v for v in row])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(tissues))


class SiteMetricsRelease:
    """The one gate every metrics dict of a site passes before it is sent; accounts what it lets through.

    Without a DP engine it returns metrics as they are. With one, see the module docstring.
    """

    def __init__(
        self,
        *,
        engine: _Engine | None,
        policy: MetricsPolicy | None = None,
        delta: float | None = None,
        accountant: str = "rdp",
        max_releases: int | None = None,
        state_path: str | Path | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy or MetricsPolicy()
        self.delta = delta
        self.accountant = accountant
        if engine is not None and delta is None:
            raise ValueError("a DP site's metrics need the engine's δ")
        if max_releases is not None and (isinstance(max_releases, bool) or int(max_releases) < 0):
            raise ValueError(f"max_releases must be an integer >= 0, got {max_releases!r}")
        self.max_releases = None if max_releases is None else int(max_releases)
        self.releases = 0
        # the release count survives a client restart (else a restarted site would charge its ledger without the
        # releases it already made): read here, written before each noised value leaves
        self.state_path = Path(state_path) if state_path is not None else None
        if self.state_path is not None and self.state_path.is_file():
            self.releases = self._load_state(self.state_path)
        self.withheld: set[str] = set()
        self._noised: dict[str, float] = {}  # what this gate produced: may pass the gate again unchanged
        seed = self.policy.seed if self.policy.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._rng = np.random.default_rng(seed)
        if self.policy.seed is not None and self.noising:
            log.warning("metrics noise is seeded (seed=%d): reproducible, so NOT private", self.policy.seed)

    @property
    def dp(self) -> bool:
        return self.engine is not None

    @property
    def noising(self) -> bool:
        return self.dp and self.policy.noise_multiplier is not None

    # -- the gate ---------------------------------------------------------------------------------------------------
    def release(
        self, metrics: Mapping[str, float], *, scores: Mapping[str, Sequence[Any]] | None = None
    ) -> dict[str, float]:
        """What may leave the site: ``metrics`` unchanged without DP; with DP only data-independent values plus,
        for each ``{prefix: per-case scores}`` in ``scores``, the noised ``{prefix}_dice_<tissue>`` and
        ``{prefix}_mean_dice`` (one accounted release per prefix)."""
        if not self.dp:
            return dict(metrics)
        out = {
            k: float(v)
            for k, v in metrics.items()
            if is_data_independent(k) or (k in self._noised and float(v) == self._noised[k])
        }
        dropped = sorted(set(metrics) - set(out))
        for prefix, case_scores in (scores or {}).items():
            noised = self._noised_dice(case_scores, prefix=prefix)
            out.update(noised)
        dropped = [k for k in dropped if k not in out]
        if dropped:
            self.withheld.update(dropped)
            log.info("DP: withheld from what leaves the site (not accounted): %s", dropped)
        return out

    def _noised_dice(self, scores: Sequence[Any], *, prefix: str) -> dict[str, float]:
        if not scores or not self.noising:
            return {}
        if self.max_releases is not None and self.releases >= self.max_releases:
            log.warning(
                "DP: the job's %d planned metric releases are used up; %s_* withheld", self.max_releases, prefix
            )
            return {}
        from fetalseg.labels import foreground_labels

        tissues = [t.name for t in foreground_labels()]
        means, sensitivity = bounded_mean(per_case_dice(scores, tissues), low=0.0, high=1.0)
        sigma = float(self.policy.noise_multiplier)  # type: ignore[arg-type]
        noisy = means + self._rng.normal(0.0, sigma * sensitivity, size=means.shape)
        self.releases += 1  # counted before anything is returned: a release that happened is accounted
        if self.state_path is not None:  # ...and on disk before it leaves, for a restarted client
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                self.state_path, {"releases": self.releases, "noise_multiplier": sigma, "prefix_last": prefix}
            )
        out = {f"{prefix}_dice_{t}": float(np.clip(v, 0.0, 1.0)) for t, v in zip(tissues, noisy)}
        out[f"{prefix}_mean_dice"] = float(np.clip(noisy.mean(), 0.0, 1.0))  # post-processing: free
        self._noised.update(out)
        return out

    def _load_state(self, path: Path) -> int:
        """Releases already made in this job by an earlier run of this site (fail closed on anything odd)."""
        try:
            state = json.loads(path.read_text())
            releases = int(state["releases"])
            sigma = float(state["noise_multiplier"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"metrics release state {path} is unreadable ({e}); refusing to release metrics") from e
        if releases < 0 or sigma != self.policy.noise_multiplier:
            raise ValueError(
                f"metrics release state {path} holds {releases} release(s) at noise multiplier {sigma}, but this job "
                f"releases at {self.policy.noise_multiplier}: not the same job's state; refusing to continue"
            )
        log.info("metrics release state %s: %d release(s) already made in this job", path, releases)
        return releases

    # -- accounting -------------------------------------------------------------------------------------------------
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The metrics' releases in the accountant's format (a Gaussian mechanism is sample rate 1)."""
        if not self.releases:
            return []
        return [(float(self.policy.noise_multiplier), 1.0, self.releases)]  # type: ignore[arg-type]

    def _epsilon(self, history: Iterable[tuple[float, float, int]]) -> float:
        from privacy.accounting import epsilon_for_history

        return epsilon_for_history(list(history), delta=float(self.delta), accountant=self.accountant)  # type: ignore[arg-type]

    @property
    def epsilon(self) -> float:
        """ε of everything released so far: DP-SGD's steps and the metrics, composed."""
        if self.engine is None:
            raise RuntimeError("no DP engine: nothing is accounted")
        return self._epsilon([*self.engine.history, *self.history])

    @property
    def planned_epsilon(self) -> float | None:
        """ε after the job's planned steps and planned metric releases (None without a DP-SGD plan)."""
        e = self.engine
        if e is None or e.planned_steps is None:
            return None
        if not (self.noising and self.max_releases):
            return e.planned_epsilon  # nothing but DP-SGD's steps is planned
        planned = [
            (e.accounting_noise_multiplier, e.sample_rate, int(e.planned_steps)),
            (float(self.policy.noise_multiplier), 1.0, self.max_releases),  # type: ignore[arg-type]
        ]
        return self._epsilon(planned)

    def report(self) -> dict[str, Any]:
        """The engine's report with ε of everything released (``epsilon``) and the metrics' share of it."""
        if self.engine is None:
            raise RuntimeError("no DP engine: nothing is accounted")
        rep = dict(self.engine.report())
        sgd = float(self.engine.epsilon)
        total = self.epsilon
        rep["epsilon_dp_sgd"] = sgd
        rep["planned_epsilon_dp_sgd"] = rep.get("planned_epsilon")
        rep["epsilon"] = total
        rep["planned_epsilon"] = self.planned_epsilon
        rep["metrics"] = {
            "released": MECHANISM if self.noising else "withheld: no data-dependent metric leaves the site",
            "noise_multiplier": self.policy.noise_multiplier,
            "releases": self.releases,
            "max_releases": self.max_releases,
            "epsilon_alone": self._epsilon(self.history) if self.releases else 0.0,
            "epsilon_share": max(total - sgd, 0.0),
            "withheld": sorted(self.withheld),
        }
        if self.releases:  # distributed DP: its ε values composed with the metric releases, like ``epsilon``
            rep.update(self.engine.distributed_report(self.history))
        return rep

    # -- ledger -----------------------------------------------------------------------------------------------------
    def reserve(self, ledger: Any, *, dataset_id: str, job_id: str) -> None:
        """Widen the job's reservation to the composed plan (DP-SGD + metric releases) before any release."""
        planned = self.planned_epsilon
        if not self.noising or planned is None:
            return
        ledger.reserve(
            job_id=job_id,
            dataset_id=dataset_id,
            epsilon=planned,
            delta=float(self.delta),  # type: ignore[arg-type]
            planned_steps=self.engine.planned_steps,  # type: ignore[union-attr]
            noise_multiplier=self.engine.noise_multiplier,  # type: ignore[union-attr]
            sample_rate=self.engine.sample_rate,  # type: ignore[union-attr]
            accountant=self.accountant,
            metrics_noise_multiplier=self.policy.noise_multiplier,
            metrics_max_releases=self.max_releases,
            **self.engine.ledger_details(self._planned_history(), planned=True),  # type: ignore[union-attr]
        )

    def record(self, ledger: Any, *, job_id: str, dataset_id: str, round: int, scope: str) -> Any:
        """Write the composed cumulative ε to the ledger (before anything of this round is sent)."""
        e = self.engine
        if e is None:
            raise RuntimeError("no DP engine: nothing is accounted")
        return ledger.record(
            job_id=job_id,
            dataset_id=dataset_id,
            epsilon=self.epsilon,
            delta=float(self.delta),  # type: ignore[arg-type]
            round=int(round),
            steps=e.steps,
            accountant=self.accountant,
            noise_multiplier=e.noise_multiplier,
            sample_rate=e.sample_rate,
            scope=scope,
            metrics_releases=self.releases,
            metrics_noise_multiplier=self.policy.noise_multiplier,
            **e.ledger_details(self.history),  # distributed DP: ε against the server alone and local, composed
        )

    def _planned_history(self) -> list[tuple[float, float, int]]:
        """The planned metric releases in the accountant's format (empty when the metrics are withheld)."""
        if not (self.noising and self.max_releases):
            return []
        return [(float(self.policy.noise_multiplier), 1.0, self.max_releases)]  # type: ignore[arg-type]
