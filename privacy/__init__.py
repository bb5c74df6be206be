"""Privacy for fetal-fl: DP-SGD per site, accounting, the site ledger, update filters and attack evaluation.

Which mechanism is differential privacy and which is not is stated in ``docs/privacy.md``. Submodules are imported
on first use, so the ledger (standard library only) does not pull in torch and Opacus.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "epsilon": "privacy.accounting",
    "epsilon_for_history": "privacy.accounting",
    "noise_multiplier_for_epsilon": "privacy.accounting",
    "SCOPE": "privacy.dpsgd",
    "DPSGDConfig": "privacy.dpsgd",
    "SitePrivacyEngine": "privacy.dpsgd",
    "LedgerCorruptError": "privacy.ledger",
    "LedgerError": "privacy.ledger",
    "LedgerNotFoundError": "privacy.ledger",
    "PrivacyBudgetExceeded": "privacy.ledger",
    "SiteLedger": "privacy.ledger",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'privacy' has no attribute {name!r}")
