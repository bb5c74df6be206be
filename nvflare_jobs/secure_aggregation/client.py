"""Site side of secure aggregation in NVFlare: key-agreement executor, task check, and the masking filter.

All three run in the site's NVFlare client-job process (not the training subprocess) and share one
:class:`privacy.secure_aggregation.SiteSession` per (job, site); the private key never leaves that process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from nvflare_jobs.config import DP_REPORT_KEY
from nvflare_jobs.guard import inspect_update
from nvflare_jobs.secure_aggregation import META_KEY, SETUP_TASK, UNMASK_TASK
from privacy.secure_aggregation import Params, ProtocolError, SiteSession
from privacy.secure_aggregation.fixed_point import DEFAULT_FRAC_BITS

_LOCK = threading.Lock()
_SESSIONS: dict[tuple[str, str], SiteSession] = {}  # (job id, site) -> session (simulator sites share a process)
_ROUNDS: dict[tuple[str, str], tuple[int, list[str]]] = {}  # (job id, site) -> (round, participants) of the task


class SecureAggregationRefusedError(RuntimeError):
    """This site will not send its update (unprotected, malformed, or failing the site-side guard)."""


def _ids(fl_ctx: FLContext) -> tuple[str, str]:
    return str(fl_ctx.get_job_id()), str(fl_ctx.get_identity_name())


def session_for(fl_ctx: FLContext) -> SiteSession:
    with _LOCK:
        session = _SESSIONS.get(_ids(fl_ctx))
    if session is None:
        raise ProtocolError("no secure-aggregation keys were agreed for this job at this site")
    return session


def _reply(message: dict[str, Any]) -> Shareable:
    # METRICS with an empty payload: protocol messages carry no model data (site policies pass them)
    return DXO(data_kind=DataKind.METRICS, data={}, meta={META_KEY: message}).to_shareable()


class SecAggExecutor(Executor):
    """Handles the key-agreement task (two steps) and the per-round unmasking task.

    Args:
        sites: the job's sites, threshold and frac_bits: from the job config this site received; the server's
            task must state the same values (a server that changed them is refused).
    """

    def __init__(self, sites: Sequence[str], threshold: int, frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        super().__init__()
        self.sites = list(sites)
        self.threshold = int(threshold)
        self.frac_bits = int(frac_bits)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            info = from_shareable(shareable).get_meta_prop(META_KEY) or {}
            if task_name == SETUP_TASK and info.get("step") == "advertise":
                return _reply(self._advertise(info, fl_ctx))
            if task_name == SETUP_TASK and info.get("step") == "share":
                return _reply(session_for(fl_ctx).setup(info["table"]))
            if task_name == UNMASK_TASK:
                site = fl_ctx.get_identity_name()
                request = (info.get("requests") or {}).get(site)
                if request is None:
                    raise ProtocolError(f"the unmask task carries no request for {site}")
                out = session_for(fl_ctx).unmask(
                    int(request["round"]),
                    request["survivors"],
                    request["dropped"],
                    request["self_shares"],
                    request["key_shares"],
                )
                self.log_info(
                    fl_ctx,
                    f"secure aggregation: round {request['round']}: self-mask shares for {sorted(out['self'])}, "
                    f"key shares for dropped {sorted(out['key'])}",
                )
                return _reply(out)
            raise ProtocolError(f"unknown secure-aggregation task {task_name!r} / step {info.get('step')!r}")
        except (ProtocolError, ValueError, KeyError, TypeError) as e:
            self.log_error(fl_ctx, f"secure aggregation REFUSED ({task_name}): {type(e).__name__}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _advertise(self, info: dict[str, Any], fl_ctx: FLContext) -> dict[str, str]:
        job, site = _ids(fl_ctx)
        stated = (sorted(info.get("sites") or []), info.get("threshold"), info.get("frac_bits"), info.get("job"))
        mine = (sorted(self.sites), self.threshold, self.frac_bits, job)
        if stated != mine:
            raise ProtocolError(f"the server's secure-aggregation parameters {stated} differ from the job's {mine}")
        session = SiteSession(site, Params(job, tuple(self.sites), self.threshold, self.frac_bits))
        with _LOCK:
            if (job, site) in _SESSIONS:
                raise ProtocolError("keys were already agreed for this job; a second key agreement is refused")
            _SESSIONS[(job, site)] = session
        self.log_info(fl_ctx, f"secure aggregation: public key {session.public_key.hex()[:16]}... sent as {site}")
        return session.advertise()


class SecAggTaskCheck(Filter):
    """Task-data filter on the training task: no secure-aggregation info, a key table the peers' tags do not
    confirm, or a participant list the site cannot mask with -> the task is refused before training."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            info = from_shareable(shareable).get_meta_prop(META_KEY)
        except Exception:
            info = None
        if not isinstance(info, dict):
            raise SecureAggregationRefusedError(
                "this job requires secure aggregation, but the training task carries no secure-aggregation round: "
                "refused before training"
            )
        session = session_for(fl_ctx)
        if not session.confirmed:
            session.confirm(info["transcript"], (info.get("tags") or {}).get(session.site, {}))
            self.log_info(fl_ctx, f"secure aggregation: key table confirmed by all {len(session.table or {})} sites")
        rnd, parts = int(info["round"]), sorted(info["participants"])
        with _LOCK:
            _ROUNDS[_ids(fl_ctx)] = (rnd, parts)
        return shareable


class SecAggMaskFilter(Filter):
    """Task-result filter, LAST before the site's audit record: the site-side guard, then the masked update.

    Args:
        max_update_norm: the job's ``server.max_update_norm`` (raised for client-level DP noise as the recipe
            computes it): the norm/NaN check the server cannot make on a masked update, made here before masking;
            a failing update is not sent (the server treats the site as dropped and recovers the round).
        distributed_dp: the job runs distributed DP (``privacy.dp_sgd.distributed``): the update is weighted by the
            site's number of training cases (the divisor its DP-GD step used), so the weighted sum the server
            unmasks is the sum of the sites' clipped-gradient sums plus the sum of their noise, in one unit. An
            update without a distributed DP-SGD report is not sent.
    """

    def __init__(self, max_update_norm: float = 1.0e3, distributed_dp: bool = False) -> None:
        super().__init__()
        self.max_update_norm = float(max_update_norm)
        self.distributed_dp = bool(distributed_dp)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        dxo = from_shareable(shareable)
        if dxo.data_kind == DataKind.METRICS:
            return shareable
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise SecureAggregationRefusedError(
                f"secure aggregation masks weight differences only, not {dxo.data_kind}"
            )
        verdict = inspect_update(dxo.data or {}, max_norm=self.max_update_norm)
        if not verdict.ok:
            self.log_error(fl_ctx, f"secure aggregation: update NOT sent (site-side guard): {verdict.reason}")
            raise SecureAggregationRefusedError(f"site-side update guard: {verdict.reason}")
        with _LOCK:
            rnd, parts = _ROUNDS.get(_ids(fl_ctx), (None, []))
        header_round = shareable.get_header(AppConstants.CURRENT_ROUND, None)
        if rnd is None or (header_round is not None and int(header_round) != rnd):
            raise SecureAggregationRefusedError(
                f"no checked secure-aggregation round for this result (round {header_round})"
            )
        meta = dict(dxo.meta or {})
        weight = meta.pop(FLMetaKey.NUM_STEPS_CURRENT_ROUND, None) or 1
        if self.distributed_dp:
            weight = distributed_weight(meta.get(DP_REPORT_KEY))
        update = {k: _as_array(v) for k, v in dxo.data.items()}
        message = session_for(fl_ctx).mask(rnd, update, float(weight), parts)
        meta[META_KEY] = {"self_shares": message["self_shares"], "self_commit": message["self_commit"]}
        DXO(data_kind=DataKind.WEIGHT_DIFF, data=message["masked"], meta=meta).update_shareable(shareable)
        self.log_info(
            fl_ctx,
            f"secure aggregation: round {rnd}: masked update sent (weight {weight} applied on the site, "
            f"{len(parts)} participants, L2 norm before masking {verdict.norm:.4g})",
        )
        return shareable


def distributed_weight(report: Any) -> int:
    """The weight of a distributed-DP update: the batch its one full-batch DP-GD step divided by (its N)."""
    rep = report.get("distributed_dp") if isinstance(report, dict) else None
    batch = report.get("expected_batch_size") if isinstance(report, dict) else None
    if not isinstance(rep, dict) or report.get("full_batch") is not True:
        raise SecureAggregationRefusedError(
            "distributed DP: the update carries no full-batch distributed DP-SGD report; not sent"
        )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SecureAggregationRefusedError(f"distributed DP: bad expected_batch_size {batch!r} in the DP report")
    return batch


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)
