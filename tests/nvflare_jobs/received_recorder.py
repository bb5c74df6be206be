"""A server input filter for tests: writes every result the server receives (metrics and meta) to a JSON-lines
file, unchanged, so a test can inspect exactly what left the sites."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(type(value))


class ReceivedRecorder(Filter):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        peer = fl_ctx.get_peer_context()
        record = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "site": peer.get_identity_name() if peer else None,
            "kind": dxo.data_kind,
            "data": _plain(dxo.data) if dxo.data_kind == DataKind.METRICS else None,
            "meta": _plain(dxo.meta),
        }
        with open(Path(self.path), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        return shareable
