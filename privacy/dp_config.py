"""DP-SGD settings and their checks, without torch or Opacus: read wherever a job config is checked (``fetal-fl fl
check``, ``nvflare_jobs.config``) so a bad ε, δ, clip, accountant or EMA decay is one clear error before any site
starts, in well under a second. The engine that runs them is :mod:`privacy.dpsgd` (which re-exports these names)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
# PRV (numerical composition) is tighter than RDP's conversion at the same σ (e.g. 11.0 vs 12.0 at σ=1, q=0.05,
# 1000 steps, δ=1e-5): the default for every new plan. RDP stays selectable (older jobs' ledgers name it).
DEFAULT_ACCOUNTANT: AccountantName = "prv"
# One δ per site everywhere (issue 24): well below 1/N for the tens to hundreds of cases a site has.
DEFAULT_DELTA = 1e-5


def check_accountant(accountant: str) -> str:
    """Return ``accountant`` if it is a supported name, else raise ValueError."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return accountant


def check_delta(delta: float) -> float:
    """δ must be a probability strictly between 0 and 1 (δ = 0 would need pure DP, which Gaussian noise is not)."""
    if not _is_number(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


MULTIPLICITY_MODES: tuple[str, ...] = ("vmap", "loop")


def check_multiplicity(value: Any) -> int:
    """K must be an integer ≥ 1 (1: one view, the plain per-case gradient)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"augmentation_multiplicity must be an integer >= 1, got {value!r}")
    return int(value)


def check_ema_decay(value: Any) -> float | None:
    """``None`` (no EMA) or a decay in [0, 1): 1 would never move from the start, > 1 or < 0 is not an average."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"ema_decay must be a number in [0, 1) or null, got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (e.g. 0.99 per step), got {value!r}")
    return float(value)


# Per-sample gradient methods: Opacus's three that work on the bundle's 3D U-Net ("ew" cannot handle
# conv_transpose3d) and this module's "loop" and "vmap". The default is chosen by bench/bench_dp.py on this model
# (bench/results/dp.md).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("loop", "vmap", "functorch", "hooks", "ghost")
DEFAULT_GRAD_SAMPLE_MODE = "vmap"


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD settings of a job: either (``noise_multiplier``, ``max_grad_norm``) or a ``target_epsilon``.

    In target-ε mode the planned number of steps must be known (``planned_steps``, or ``planned_rounds`` ×
    ``local_epochs`` full passes over the local data); the noise is then computed so that ε after exactly those
    steps is at most the target, and the engine refuses any step beyond the plan.

    Small-N DP (issue 24; De et al. 2022): ``full_batch`` is DP-GD, every training case in every step (q = 1, one
    step per local epoch, so ``planned_rounds × local_epochs`` steps; the engine then takes no batch size);
    ``augmentation_multiplicity`` K averages K augmented views of one case before clipping (one case stays one
    privacy unit: ε does not depend on K; :mod:`privacy.multiplicity`); ``ema_decay`` makes the site's weights
    between steps an EMA of its DP iterates (post-processing, no ε; :mod:`privacy.ema`). Only parameters with
    ``requires_grad`` are clipped, noised and trained (a frozen weight is neither noised nor counted in a norm).
    """

    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = DEFAULT_DELTA
    planned_steps: int | None = None
    planned_rounds: int | None = None
    local_epochs: int | None = None
    accountant: str = DEFAULT_ACCOUNTANT
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    full_batch: bool = False
    augmentation_multiplicity: int = 1
    ema_decay: float | None = None
    seed: int | None = None  # reproducible noise and sampling: tests only (a known seed voids the guarantee)
    # Distributed DP under secure aggregation (privacy.secure_aggregation.distributed_dp): the noise above is what
    # the unmasked SUM carries against the server alone; this site adds σ/√threshold. The job fills in the sites and
    # the threshold (nvflare_jobs.plan); colluding_sites is the SITE's choice of what its ledger is charged for
    # (None: every other site may collude with the server = the local-DP ε of σ/√threshold).
    distributed: bool = False
    distributed_sites: int | None = None
    distributed_threshold: int | None = None
    colluding_sites: int | None = None

    def __post_init__(self) -> None:
        _positive_or_none("noise_multiplier", self.noise_multiplier)
        _positive_or_none("target_epsilon", self.target_epsilon)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier (with max_grad_norm) or target_epsilon, "
                f"got noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        if self.max_grad_norm is None:
            raise ValueError("max_grad_norm (the per-sample clip norm) is required")
        _positive_or_none("max_grad_norm", self.max_grad_norm)
        check_delta(self.delta)
        for name in ("planned_steps", "planned_rounds", "local_epochs"):
            _int_at_least_or_none(name, getattr(self, name), 1)
        if (self.planned_rounds is None) != (self.local_epochs is None):
            raise ValueError("planned_rounds and local_epochs go together (planned steps = rounds × epochs × batches)")
        if self.planned_steps is not None and self.planned_rounds is not None:
            raise ValueError("give planned_steps or planned_rounds + local_epochs, not both")
        if self.target_epsilon is not None and self.planned_steps is None and self.planned_rounds is None:
            raise ValueError("target_epsilon needs the plan: planned_steps, or planned_rounds and local_epochs")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.full_batch, bool):
            raise ValueError(f"full_batch must be true or false, got {self.full_batch!r}")
        check_multiplicity(self.augmentation_multiplicity)
        if self.augmentation_multiplicity > 1 and self.grad_sample_mode not in MULTIPLICITY_MODES:
            raise ValueError(
                f"augmentation_multiplicity > 1 needs grad_sample_mode in {MULTIPLICITY_MODES} (the views of a case "
                f"are averaged before clipping there), got {self.grad_sample_mode!r}"
            )
        check_ema_decay(self.ema_decay)
        self._check_distributed()

    def _check_distributed(self) -> None:
        """Distributed DP's ε holds only when the sum the server unmasks is linear in each site's noised gradient
        sum taken at the public global model: one full-batch DP-GD step per round (Poisson batches would differ in
        size per site, several local steps would take gradients at points only the site knows) and no EMA."""
        if not isinstance(self.distributed, bool):
            raise ValueError(f"distributed must be true or false, got {self.distributed!r}")
        bound = (self.distributed_sites, self.distributed_threshold, self.colluding_sites)
        if not self.distributed:
            if any(v is not None for v in bound):
                raise ValueError("distributed_sites / distributed_threshold / colluding_sites need distributed: true")
            return
        from privacy.secure_aggregation.distributed_dp import check_colluding, check_sites_threshold

        if not self.full_batch:
            raise ValueError(
                "distributed: true needs full_batch: true (one DP-GD step over every case per round; the noise of "
                "the sites adds up only for one gradient per site per round, taken at the global model)"
            )
        if self.ema_decay is not None:
            raise ValueError(
                "distributed: true cannot be combined with ema_decay (the sent weights would not be linear)"
            )
        if self.planned_steps is not None:
            raise ValueError("distributed: true takes the job's plan (one step per round); remove planned_steps")
        if self.planned_rounds is not None and self.local_epochs != 1:
            raise ValueError(f"distributed: true needs one local epoch per round, got local_epochs={self.local_epochs}")
        if (self.distributed_sites is None) != (self.distributed_threshold is None):
            raise ValueError("distributed_sites and distributed_threshold go together (filled in by the job)")
        if self.distributed_sites is not None:
            check_sites_threshold(self.distributed_sites, self.distributed_threshold)  # type: ignore[arg-type]
            check_colluding(self.colluding_sites, self.distributed_sites)
        elif self.colluding_sites is not None:
            raise ValueError("colluding_sites needs distributed_sites (filled in by the job)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPSGDConfig:
        """Build from a job config dict; unknown keys are an error (a typo must not silently drop a setting)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"DP-SGD config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DP-SGD config keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- what follows from the dataset -------------------------------------------------------------------------
    def check_dataset(self, dataset_size: int, *, where: str = "delta") -> None:
        """δ must be well below 1/N: with δ ≥ 1/N, releasing one random case verbatim would satisfy (ε, δ)-DP.

        Called with the site's number of training cases before anything is built or trained (the site is the only
        one that knows N); ``where`` names the setting in the error (e.g. ``privacy.dp_sgd.delta``)."""
        _int_at_least("dataset_size", dataset_size, 1)
        if self.delta >= 1.0 / dataset_size:
            raise ValueError(
                f"{where}={self.delta:g} must be < 1/N = {1.0 / dataset_size:.3g} for N={dataset_size} training "
                f"cases (with δ ≥ 1/N a mechanism that publishes one whole case satisfies (ε, δ)-DP): set {where} "
                f"to {DEFAULT_DELTA:g} (the project's δ) or at most {0.1 / dataset_size:.1g} = 1/(10·N)"
            )

    def planned_total_steps(self, *, dataset_size: int, batch_size: int | None) -> int | None:
        """Optimizer steps in the whole job (None if the config does not say); full batch: one per local epoch."""
        if self.planned_steps is not None:
            return int(self.planned_steps)
        if self.planned_rounds is not None and self.local_epochs is not None:
            per_epoch = 1 if self.full_batch else steps_per_epoch(dataset_size, batch_size)  # type: ignore[arg-type]
            return int(self.planned_rounds) * int(self.local_epochs) * per_epoch
        return None


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Poisson draws per pass over the data: ceil(N / B), as Opacus's ``DPDataLoader`` uses."""
    _int_at_least("dataset_size", dataset_size, 1)
    _int_at_least("batch_size", batch_size, 1)
    return math.ceil(dataset_size / batch_size)


def _positive_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _int_at_least_or_none(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        _int_at_least(name, value, minimum)


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
