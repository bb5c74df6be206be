"""Server-side gate for client updates: a NaN, an Inf or an absurd norm is rejected, never averaged in.

One broken site (diverged optimiser, corrupted memory, a malicious or buggy client) would otherwise poison the
global model for every hospital in a single round: FedAvg is a weighted mean, and one non-finite value makes the
whole parameter non-finite. :func:`inspect_update` is the plain check (tested without NVFlare);
:class:`UpdateGuard` runs it as a server task-result filter. A rejected update is replaced by an error reply,
so the workflow counts that site as failed for the round and goes on with the others when ``min_clients``
still allows (see :mod:`nvflare_jobs.controllers`), with an ERROR line in the server log naming the site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

REJECT_CODE = ReturnCode.TASK_RESULT_FILTER_ERROR


@dataclass(frozen=True)
class UpdateVerdict:
    """Outcome of :func:`inspect_update`; ``reason`` says why an update was rejected."""

    ok: bool
    reason: str
    norm: float
    nonfinite: int
    size: int


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def inspect_update(params: Mapping[str, Any], *, max_norm: float | None) -> UpdateVerdict:
    """Check an update: non-empty, numeric, every value finite, global L2 norm at most ``max_norm``.

    ``max_norm=None`` skips the norm test (for full weights, whose norm is not a sign of trouble).
    """
    if max_norm is not None and not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be a positive finite number or None, got {max_norm!r}")
    if not isinstance(params, Mapping) or not params:
        return UpdateVerdict(False, "the update is empty", float("nan"), 0, 0)
    sq_sum, nonfinite, size, bad = 0.0, 0, 0, []
    for name, value in params.items():
        arr = _as_array(value)
        if arr.dtype.kind not in "fiub":
            return UpdateVerdict(False, f"{name!r} is not numeric (dtype {arr.dtype})", float("nan"), 0, size)
        arr = arr.astype(np.float64, copy=False)
        finite = np.isfinite(arr)
        n_bad = int(arr.size - np.count_nonzero(finite))
        if n_bad:
            nonfinite += n_bad
            bad.append(name)
            arr = np.where(finite, arr, 0.0)
        sq_sum += float(np.sum(arr * arr))
        size += int(arr.size)
    norm = math.sqrt(sq_sum) if math.isfinite(sq_sum) else float("inf")
    if nonfinite:
        shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        return UpdateVerdict(False, f"{nonfinite} non-finite value(s) (NaN/Inf) in {shown}", norm, nonfinite, size)
    if max_norm is not None and norm > max_norm:
        return UpdateVerdict(False, f"L2 norm {norm:.4g} exceeds max_update_norm {max_norm:.4g}", norm, 0, size)
    return UpdateVerdict(True, "ok", norm, 0, size)


class UpdateGuard(Filter):
    """Server task-result filter that rejects updates failing :func:`inspect_update`.

    Args:
        max_norm: largest accepted global L2 norm of a weight DIFF (full weights are only checked for
            non-finite values).
        data_kind: the one model data kind the job's workflow aggregates (``"WEIGHT_DIFF"`` for the fetal brain
            job); a model update of the other kind is rejected. Otherwise a site could send full WEIGHTS into a
            DIFF job, escaping the norm limit and being added to the global model as if it were a DIFF. None
            (the default) accepts both kinds.
    """

    def __init__(self, max_norm: float = 1.0e3, data_kind: str | None = None) -> None:
        super().__init__()
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        if data_kind is not None and data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            raise ValueError(f"data_kind must be 'WEIGHT_DIFF', 'WEIGHTS' or None, got {data_kind!r}")
        self.max_norm = float(max_norm)
        self.data_kind = None if data_kind is None else str(DataKind(data_kind).value)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # already an error reply: nothing to aggregate
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return shareable  # not a model update (e.g. a validation result)
        if dxo.data_kind not in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            return shareable
        limit = self.max_norm if dxo.data_kind == DataKind.WEIGHT_DIFF else None
        if self.data_kind is not None and dxo.data_kind != self.data_kind:
            kind = getattr(dxo.data_kind, "value", dxo.data_kind)
            verdict = UpdateVerdict(False, f"a {kind} update where the job aggregates {self.data_kind}", 0.0, 0, 0)
        else:
            verdict = inspect_update(dxo.data or {}, max_norm=limit)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name(default="?") if peer else "?"
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, None)
        if verdict.ok:
            self.log_info(fl_ctx, f"update from {site} (round {rnd}) accepted: L2 norm {verdict.norm:.4g}")
            return shareable
        self.log_error(
            fl_ctx, f"REJECTED update from {site} (round {rnd}): {verdict.reason}; it will not be aggregated"
        )
        reply = make_reply(REJECT_CODE)
        if rnd is not None:
            reply.set_header(AppConstants.CURRENT_ROUND, rnd)
        return reply
