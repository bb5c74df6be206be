"""A server input filter for tests: records the weight names of every model update the server receives (the DXO's
keys as they arrived), so a test can check what left each site."""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


class ReceivedKeys(Filter):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            peer = fl_ctx.get_peer_context()
            record = {"site": peer.get_identity_name() if peer else None, "keys": sorted(dxo.data or {})}
            with open(Path(self.path), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        return shareable
