"""A server input filter for tests: saves every model update the server receives (after the filters before it,
e.g. the UpdateGuard) as ``<folder>/<site>_round<r>.npz`` and its ``NUM_STEPS_CURRENT_ROUND`` (FedAvg's weight) as
``<site>_round<r>.json``, so a test can recompute the aggregation itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants


class ReceivedUpdates(Filter):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            peer = fl_ctx.get_peer_context()
            site = peer.get_identity_name() if peer else "unknown"
            rnd = shareable.get_header(AppConstants.CURRENT_ROUND, -1)
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            arrays = {k: np.asarray(v) for k, v in (dxo.data or {}).items()}
            np.savez(Path(self.folder) / f"{site}_round{rnd}.npz", **arrays)
            steps = (dxo.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
            (Path(self.folder) / f"{site}_round{rnd}.json").write_text(json.dumps({"num_steps": steps}))
        return shareable
