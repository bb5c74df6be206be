"""Distributed DP under secure aggregation: each site adds a share of the Gaussian noise the sum needs (issue 20).

Why: with secure aggregation the server sees only the sum of the sites' updates, so the noise that protects one
site's data can come from every site: if each of the surviving sites adds noise of multiplier ``σ_site``, the sum
carries ``σ_site·√(survivors)``. Less noise per site, the same noise in what the server sees. How much of it
protects a given site depends on whom that site trusts, so this module states every ε explicitly:

* **against the server alone** (it follows the protocol; at least ``t`` sites survive each round, the threshold
  below which secure aggregation stops the job): the sum carries at least ``σ_site·√t``;
* **against the server colluding with ``c`` other sites** (they know, hence subtract, their own noise; in the
  worst case every colluder is among the ``t`` survivors): ``σ_site·√max(1, t − c)``; with ``c = K − 1`` only the
  site's own noise is left: exactly the local-DP ε of ``σ_site``.

Dropouts: the share is scaled to the threshold, ``σ_site = σ/√t`` (not ``σ/√K``), so any round the server can
unmask (``≥ t`` survivors) carries at least the planned ``σ``; with all ``K`` sites present it carries more.

This holds only when what is summed is linear in each site's noised gradient sum computed at the public global
model; :mod:`privacy.dp_config` refuses the settings where it is not (see ``DPSGDConfig``), and the site's
secure-aggregation filter weights each update by the site's case count so the noise adds up in one unit.

Maths only (no NVFlare, no torch); ε by :mod:`privacy.accounting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOCAL = "local"  # the conservative trust level: c = K − 1 (every other site colludes with the server)
TRUST_HELP = "an integer c in [0, K-1] (sites assumed to collude with the server), or 'all' (= K-1, the default)"


def check_sites_threshold(sites: int, threshold: int) -> None:
    """``1 <= t <= K`` (secure aggregation itself also requires a strict majority; not needed for the maths)."""
    for name, v in (("sites", sites), ("threshold", threshold)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"distributed DP: {name} must be an integer >= 1, got {v!r}")
    if threshold > sites:
        raise ValueError(f"distributed DP: threshold {threshold} exceeds the {sites} sites")


def check_colluding(colluding: Any, sites: int) -> int | None:
    """``None`` (all other sites may collude) or an integer ``c`` in ``[0, K − 1]``."""
    if colluding is None:
        return None
    if isinstance(colluding, bool) or not isinstance(colluding, int) or not 0 <= colluding <= sites - 1:
        raise ValueError(f"colluding_sites must be {TRUST_HELP} with K={sites}, got {colluding!r}")
    return int(colluding)


def parse_colluding(text: str | None, sites: int) -> int | None:
    """The site admin's setting as text (an environment variable): ``''``/``'all'`` → None, ``'0'`` → 0, ..."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"colluding sites must be {TRUST_HELP}, got {text!r}") from None
    return check_colluding(value, sites)


@dataclass(frozen=True)
class DistributedNoise:
    """The noise plan of one site: ``noise_multiplier`` (σ) is what the unmasked sum must carry against the server
    alone; the site adds ``site_noise_multiplier`` = σ/√t; ``colluding_sites`` (None: K − 1) is the site's trust."""

    sites: int
    threshold: int
    noise_multiplier: float
    colluding_sites: int | None = None

    def __post_init__(self) -> None:
        check_sites_threshold(self.sites, self.threshold)
        s = self.noise_multiplier
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {s!r}")
        check_colluding(self.colluding_sites, self.sites)

    @property
    def site_noise_multiplier(self) -> float:
        """What this site adds per step: σ/√t, so any ``t`` survivors together carry σ."""
        return float(self.noise_multiplier) / math.sqrt(self.threshold)

    @property
    def colluding(self) -> int:
        """The ``c`` the charged ε assumes (the conservative K − 1 when the site did not choose)."""
        return self.sites - 1 if self.colluding_sites is None else int(self.colluding_sites)

    def honest_shares(self, colluding: int, *, survivors: int | None = None) -> int:
        """Noise shares an adversary of the server + ``colluding`` sites cannot subtract, worst case: the colluders
        are all among the round's ``survivors`` (default: the threshold, the fewest a round can be unmasked with);
        the protected site's own share always counts."""
        check_colluding(colluding, self.sites)
        n = self.threshold if survivors is None else int(survivors)
        if not self.threshold <= n <= self.sites:
            raise ValueError(f"survivors must be in [t={self.threshold}, K={self.sites}], got {survivors!r}")
        return max(1, n - int(colluding))

    def effective_noise_multiplier(self, colluding: int, *, survivors: int | None = None) -> float:
        """σ_site·√(honest shares): the noise that protects this site's data against that adversary."""
        return self.site_noise_multiplier * math.sqrt(self.honest_shares(colluding, survivors=survivors))

    @property
    def server_noise_multiplier(self) -> float:
        """Against the server alone (c = 0, ``t`` survivors): σ_site·√t = σ."""
        return self.effective_noise_multiplier(0)

    @property
    def charged_noise_multiplier(self) -> float:
        """Against the adversary the site chose to count (``colluding_sites``): what its ledger is charged for."""
        return self.effective_noise_multiplier(self.colluding)

    def epsilons(
        self,
        *,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str,
        extra_history: Sequence[tuple[float, float, int]] = (),
    ) -> dict[str, float]:
        """ε against the server alone, against the server + all other sites (local DP), and the charged one,
        after ``steps`` DP steps composed with ``extra_history`` (e.g. the site's noised metric releases)."""
        from privacy.accounting import epsilon_for_history

        def eps(sigma: float) -> float:
            history = [(sigma, float(sample_rate), int(steps)), *extra_history]
            return epsilon_for_history(history, delta=delta, accountant=accountant)  # type: ignore[arg-type]

        local = eps(self.site_noise_multiplier)
        server = eps(self.server_noise_multiplier)
        charged = eps(self.charged_noise_multiplier)
        return {"epsilon_server": server, "epsilon_local": local, "epsilon_charged": charged}

    def describe(self) -> dict[str, Any]:
        """Plain JSON for reports and ledger entries."""
        return {
            "sites": self.sites,
            "threshold": self.threshold,
            "colluding_sites": self.colluding,
            "aggregate_noise_multiplier": float(self.noise_multiplier),
            "site_noise_multiplier": self.site_noise_multiplier,
            "server_noise_multiplier": self.server_noise_multiplier,
            "charged_noise_multiplier": self.charged_noise_multiplier,
        }
