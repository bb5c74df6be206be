"""A dishonest server for one test: it relays a key table in which site-3's public key is replaced by its own."""

from __future__ import annotations

from typing import Any

from nvflare_jobs.secure_aggregation.server import SecureFetalFedAvg
from privacy.secure_aggregation import keys


class TamperingFedAvg(SecureFetalFedAvg):
    def _ask(self, task: str, message: dict[str, Any], targets: list[str]) -> dict[str, dict[str, Any]]:
        if message.get("step") == "share":
            forged = keys.public_bytes(keys.new_private_key()).hex()
            message = {**message, "table": {**message["table"], "site-3": forged}}
        return super()._ask(task, message, targets)
