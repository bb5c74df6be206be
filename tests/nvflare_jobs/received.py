"""A server input filter for tests: records every result the server receives (after the filters before it, e.g. the
UpdateGuard), unchanged, so a test can check exactly what left the sites.

One JSON line per result in ``path``: the task, the site, the round, the DXO's kind, the weight names of a model
update (``keys``, as they arrived), a metrics result's values (``data``) and the meta (plain values). With
``arrays=True`` a model update's arrays are also saved next to ``path`` as ``<site>_round<r>.npz``, so a test can
recompute the aggregation itself (FedAvg's weight is the meta's ``NUM_STEPS_CURRENT_ROUND``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

UPDATE_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(type(value))


def read_received(path: Path, *, updates_only: bool = False) -> list[dict[str, Any]]:
    """The records :class:`ReceivedRecorder` wrote to ``path`` (only model updates with ``updates_only``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["keys"] is not None] if updates_only else rows


class ReceivedRecorder(Filter):
    def __init__(self, path: str, arrays: bool = False) -> None:
        super().__init__()
        self.path = path
        self.arrays = arrays

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else None
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, -1)
        update = dxo.data_kind in UPDATE_KINDS
        record = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "site": site,
            "round": rnd,
            "kind": dxo.data_kind,
            "keys": sorted(dxo.data or {}) if update else None,
            "data": _plain(dxo.data) if dxo.data_kind == DataKind.METRICS else None,
            "meta": _plain(dxo.meta),
        }
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if update and self.arrays:
            arrays = {k: np.asarray(v) for k, v in (dxo.data or {}).items()}
            np.savez(path.parent / f"{site or 'unknown'}_round{rnd}.npz", **arrays)
        return shareable
