"""Privacy accounting for the (Poisson-)subsampled Gaussian mechanism: plain functions, no state.

Why a separate module: the numbers a site admin sees (ε for a job, σ needed for a target ε, the client-level ε of
a noised update) must come from one place that is tested against an independent implementation (Google's
``dp-accounting``, see ``tests/privacy/test_accounting.py``). The math is Opacus's: RDP (Mironov et al.; conversion
of Balle et al. 2020) and PRV (Gopi et al. 2021, numerical composition; the returned value is the upper bound).

A *history* is a sequence of ``(noise_multiplier, sample_rate, steps)`` triples, the format of Opacus's accountants,
so heterogeneous runs (e.g. a job resumed with a different noise) compose exactly.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from privacy.dp_config import (  # noqa: F401  (re-exported)
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    AccountantName,
    _is_number,
    check_accountant,
    check_delta,
)

log = logging.getLogger(__name__)

History = Sequence[tuple[float, float, int]]

# Largest σ the search for a target ε tries; a target needing more is refused (training would learn nothing).
MAX_NOISE_MULTIPLIER = 1e4


def check_history(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Validate and normalise a history; every entry must be a well-formed subsampled Gaussian release."""
    out: list[tuple[float, float, int]] = []
    for entry in history:
        try:
            sigma, q, steps = entry
        except (TypeError, ValueError):
            raise ValueError(f"history entries must be (noise_multiplier, sample_rate, steps), got {entry!r}") from None
        if not _is_number(sigma) or not float(sigma) > 0 or not math.isfinite(float(sigma)):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if not _is_number(q) or not 0.0 < float(q) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if int(steps) > 0:
            out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = DEFAULT_ACCOUNTANT,
) -> float:
    """ε after ``steps`` releases of the Poisson-subsampled Gaussian mechanism (``sample_rate`` = 1: no subsampling).

    ``noise_multiplier`` is σ / sensitivity (Opacus's convention: the noise std divided by the clip norm).
    """
    return epsilon_for_history([(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def epsilon_for_history(history: History, *, delta: float, accountant: AccountantName = DEFAULT_ACCOUNTANT) -> float:
    """ε of the composition of every release in ``history`` at ``delta``; 0.0 for an empty history."""
    check_accountant(accountant)
    delta = check_delta(delta)
    entries = check_history(history)
    if not entries:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(entries)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # PRV at sample_rate = 1 takes log(0) on a branch it then discards; not an error.
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta))
        if accountant == "prv" and eps == math.inf:
            # PRV's discretised domain cannot hold very large ε (e.g. σ=0.5, q=0.5, 910 steps gives inf): RDP's
            # conversion is also a valid upper bound, only looser, so the claim "ε ≤ value" still holds.
            log.info("PRV returned ε=inf for %s at δ=%g; reporting RDP's (looser, still valid) bound", entries, delta)
            rdp = RDPAccountant()
            rdp.history = list(entries)
            eps = float(rdp.get_epsilon(delta=delta))
    if not math.isfinite(eps) or eps < 0:
        raise ArithmeticError(f"{accountant} accountant returned ε={eps} for {entries} at δ={delta}")
    return eps


def noise_multiplier_for_epsilon(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = DEFAULT_ACCOUNTANT,
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (within ``tolerance`` × target) whose ε after ``steps`` is at most ``target_epsilon``.

    The search is Opacus's ``get_noise_multiplier`` (bisection keeping the upper end of its bracket); the result is
    re-checked with :func:`epsilon`, so it always satisfies ``epsilon(σ) <= target_epsilon``.
    """
    if not _is_number(target_epsilon) or not float(target_epsilon) > 0 or not math.isfinite(float(target_epsilon)):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    check_history([(1.0, sample_rate, steps)])
    target = float(target_epsilon)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # PRV at q = 1: see epsilon_for_history
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=check_delta(delta),
                    sample_rate=float(sample_rate),
                    steps=int(steps),
                    accountant=check_accountant(accountant),
                    epsilon_tolerance=tolerance * target,
                )
            )
    except ValueError as exc:  # Opacus: "The privacy budget is too low." (σ would exceed its MAX_SIGMA)
        raise ValueError(
            f"target ε={target} at δ={delta} over {steps} steps (sample rate {sample_rate:.4g}) needs more noise "
            f"than the accountant can search ({exc}): raise the target ε, lower the number of steps or the sample rate"
        ) from exc
    if sigma > MAX_NOISE_MULTIPLIER:
        raise ValueError(
            f"target ε={target} at δ={delta} over {steps} steps (sample rate {sample_rate:.4g}) needs "
            f"σ={sigma:.4g} > {MAX_NOISE_MULTIPLIER:g}: raise the target ε, lower the steps or the sample rate"
        )
    eps_at_sigma = epsilon(
        noise_multiplier=sigma, sample_rate=sample_rate, steps=int(steps), delta=delta, accountant=accountant
    )
    if eps_at_sigma > target:  # fail closed: never plan a σ whose ε (by this module's accountant) misses the target
        raise ArithmeticError(f"σ={sigma} from the noise search gives ε={eps_at_sigma} > target {target}")
    log.debug(
        "σ=%.4f gives ε=%.4f (target %.4f, %s, q=%.4g, %d steps)",
        sigma,
        eps_at_sigma,
        target,
        accountant,
        sample_rate,
        steps,
    )
    return sigma
