"""NVFlare ``DXOFilter`` adapters over :mod:`privacy.filters` (the only module of ``privacy`` importing nvflare).

Usable by class path from job configs and from a site's ``privacy.json`` scopes, e.g.::

    {"path": "privacy.nvflare_filters.SparsePercentileFilter", "args": {"percentile": 90}}     # client, results
    {"path": "privacy.nvflare_filters.SparseUpdateDecoder", "args": {}}                        # server, results
    {"path": "privacy.nvflare_filters.ClientDPFilter", "args": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
    {"path": "privacy.nvflare_filters.FailClosedPercentilePrivacy", "args": {"percentile": 90, "gamma": 0.01}}

Fail-closed everywhere, unlike NVFlare's own ``PercentilePrivacy`` (which returns None — the update then leaves
unfiltered — on bad parameters, and is skipped silently for a data kind it is not configured for):

* bad parameters raise in ``__init__``, i.e. when the job starts;
* a task result that is not a DXO, or carries model data other than ``WEIGHT_DIFF`` (full ``WEIGHTS`` cannot be
  clipped or percentile-filtered meaningfully), raises; NVFlare then replies ``TASK_RESULT_FILTER_ERROR`` and
  nothing is sent;
* ``METRICS`` results (validation scores) pass unchanged.

The jobs must send differences: ``TransferType.DIFF`` / ``params_type=DIFF``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

from fetalseg.site_env import SiteDataError, privacy_ledger, site_data_dir, site_dataset_id, site_state
from privacy.accounting import DEFAULT_ACCOUNTANT, DEFAULT_DELTA
from privacy.filters import (
    CLIENT_DP_SCOPE,
    CLIENT_DP_UNIT,
    NOT_DP_NOTICE,
    SPARSE_FORMAT,
    ClientDPAccountant,
    ClientDPConfig,
    FilterReport,
    check_percentile_params,
    check_update,
    clip_and_noise,
    decode_sparse,
    encode_sparse,
    percentile_share,
)

log = logging.getLogger(__name__)

REPORT_META_KEY = "fetalfl_privacy"  # list of FilterReport dicts, in the order the filters ran
SPARSE_META_KEY = "fetalfl_sparse"
_PASS_KINDS = (DataKind.METRICS,)


class _FailClosedDXOFilter(DXOFilter):
    """Routes every leaf DXO to :meth:`filter_update` (WEIGHT_DIFF), passes METRICS, refuses everything else."""

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() == ReturnCode.OK:
            try:
                from_shareable(shareable)
            except Exception as exc:
                raise ValueError(f"{type(self).__name__}: the task result is not a DXO; refusing to send it") from exc
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.data_kind in _PASS_KINDS:
            return dxo
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(
                f"{type(self).__name__} filters weight differences only and got a {dxo.data_kind} result; "
                "send TransferType.DIFF (params_type DIFF). Refusing to send it unfiltered"
            )
        return self.filter_update(dxo, fl_ctx)

    def filter_update(self, dxo: DXO, fl_ctx: FLContext) -> DXO:
        raise NotImplementedError

    def _log_report(self, report: FilterReport, fl_ctx: FLContext) -> None:
        report.log(log)
        self.log_info(
            fl_ctx,
            f"{report.filter}: kept {100 * report.fraction_kept:.2f}%, L2 {report.norm_before:.4g} -> "
            f"{report.norm_after:.4g}, bytes {report.bytes_before} -> {report.bytes_after} {report.details}",
        )


def _add_report(meta: dict[str, Any], report: FilterReport) -> dict[str, Any]:
    meta = dict(meta or {})
    meta[REPORT_META_KEY] = [*list(meta.get(REPORT_META_KEY) or []), _plain(report.as_dict())]
    return meta


def _to_numpy(data: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """Arrays as numpy, and whether they came as torch tensors (so they go back the same way)."""
    torch_in = False
    out = {}
    for name, value in data.items():
        if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
            torch_in = True
            value = value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out, torch_in


def _from_numpy(data: dict[str, np.ndarray], as_torch: bool) -> dict[str, Any]:
    if not as_torch:
        return data
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in data.items()}  # keeps 0-d shapes


def _plain(obj: Any) -> Any:
    """Meta values as plain Python types (NVFlare's serializer needs no numpy scalars there)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _num_steps(dxo: DXO) -> int:
    steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)
    try:
        steps = int(steps)
    except (TypeError, ValueError):
        raise ValueError(f"bad {MetaKey.NUM_STEPS_CURRENT_ROUND} meta value {steps!r}") from None
    return max(steps, 1)


class SparsePercentileFilter(_FailClosedDXOFilter):
    """Client result filter: send only |Δw| above the ``percentile`` (sparse), NOT differential privacy.

    ``percentile=90`` shares the largest 10 % of values. ``gamma`` (optional) clips shared |Δw / steps| as NVFlare's
    filter does. The result is an ``APP_DEFINED`` DXO that only :class:`SparseUpdateDecoder` on the server turns
    back into a ``WEIGHT_DIFF``; without the decoder the aggregator rejects it (never aggregates it wrongly).
    """

    def __init__(self, percentile: float = 90, gamma: float | None = None) -> None:
        check_percentile_params(percentile=percentile, gamma=gamma)
        super().__init__()
        self.percentile = float(percentile)
        self.gamma = None if gamma is None else float(gamma)
        log.info("SparsePercentileFilter(percentile=%g, gamma=%s): %s", self.percentile, self.gamma, NOT_DP_NOTICE)

    def filter_update(self, dxo: DXO, fl_ctx: FLContext) -> DXO:
        arrays, torch_in = _to_numpy(dxo.data)
        payload, report = encode_sparse(arrays, percentile=self.percentile, gamma=self.gamma, num_steps=_num_steps(dxo))
        payload["torch"] = torch_in
        self._log_report(report, fl_ctx)
        meta = _add_report(dxo.meta, report)
        meta[SPARSE_META_KEY] = SPARSE_FORMAT
        return DXO(data_kind=DataKind.APP_DEFINED, data=payload, meta=meta)


class SparseUpdateDecoder(DXOFilter):
    """Server result filter: turn :class:`SparsePercentileFilter`'s payload back into a dense ``WEIGHT_DIFF``.

    Other results pass unchanged. A payload marked sparse that does not decode raises (the result is dropped).
    """

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=[DataKind.APP_DEFINED])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.get_meta_prop(SPARSE_META_KEY) != SPARSE_FORMAT:
            return dxo
        payload = dxo.data
        dense = decode_sparse(payload)
        meta = dict(dxo.meta)
        meta.pop(SPARSE_META_KEY, None)
        received = sum(
            np.asarray(v).nbytes for t in payload["tensors"].values() for v in t.values() if isinstance(v, np.ndarray)
        )
        self.log_info(fl_ctx, f"decoded sparse update: {len(dense)} tensors, {received} bytes of arrays received")
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data=_from_numpy(dense, bool(payload.get("torch"))), meta=meta)


class ClientDPFilter(_FailClosedDXOFilter):
    """Client result filter: clip the update's L2 norm and add Gaussian noise (client-level DP, per round).

    ε composes over the rounds this filter has noised and is put in the result's metadata (``fetalfl_privacy``) and
    the site's log. The count survives a client restart: it is kept in ``state_path``, by default
    ``$FETAL_FL_SITE_STATE`` (else the app folder's ``privacy_state/``) ``/client_dp_<site>_<job>.json`` — one file
    per site and job, so give ``state_path`` only in a site's own ``privacy.json``, never in a job config.

    With a site ledger (``$FETAL_FL_PRIVACY_LEDGER``) every noised update is charged before it leaves, under job id
    ``<job>/client_dp`` on the dataset DP-SGD charges: the cumulative ε against any change of the site's data (see
    :meth:`~privacy.filters.ClientDPConfig.epsilon_any_change`), its δ and accountant. An update that would take the
    dataset past its budget is refused (nothing is sent). That dataset is ``<site>/<data folder name>``, the folder
    found by :func:`fetalseg.site_env.site_data_dir` from the site's environment (``$FETAL_FL_SITE_DATA``, else
    ``$FETAL_FL_DATA_ROOT/<site>``) or ``data_root``: the job's ``data.root``, which the project's job hands over when
    it builds the filter (in a site's own ``privacy.json`` set the environment instead). With a ledger and no data
    folder the update is refused.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        delta: float = DEFAULT_DELTA,
        adjacency: str = "replace",
        accountant: str = DEFAULT_ACCOUNTANT,
        state_path: str | None = None,
        data_root: str | None = None,
    ) -> None:
        self.config = ClientDPConfig(
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            delta=delta,
            adjacency=adjacency,
            accountant=accountant,
        )
        super().__init__()
        # NVFlare's job exporter rebuilds a filter from its constructor arguments found as same-named attributes:
        # keep each one (plain values), and keep the accountant object under another name.
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.adjacency = adjacency
        self.accountant = accountant
        self.state_path = state_path
        self.data_root = data_root
        # an explicit state file is read now (a mismatch fails at job start); the default one needs the site and job
        self.client_accountant: ClientDPAccountant | None = (
            ClientDPAccountant(config=self.config, state_path=state_path) if state_path else None
        )
        self._rng = np.random.default_rng()

    def filter_update(self, dxo: DXO, fl_ctx: FLContext) -> DXO:
        arrays, torch_in = _to_numpy(dxo.data)
        check_update(arrays)
        accountant = self._accountant(fl_ctx)
        ledger = _site_ledger(fl_ctx, self.data_root)
        if ledger is not None:  # refuse before noising if this release does not fit the dataset's budget
            charged = self.config.epsilon_any_change(accountant.rounds + 1)  # the job's ledger ε after this update
            ledger.ledger.check_budget(
                dataset_id=ledger.dataset_id, planned_epsilon=charged, delta=self.config.delta, job_id=ledger.job_id
            )
        noised, report = clip_and_noise(arrays, config=self.config, rng=self._rng)
        accountant.step()
        report.details.update(accountant.report())
        if ledger is not None:  # written (fsync'ed) before the update leaves; over budget raises: nothing is sent
            ledger.ledger.record(
                job_id=ledger.job_id,
                dataset_id=ledger.dataset_id,
                epsilon=charged,
                delta=self.config.delta,
                round=accountant.rounds - 1,
                mechanism="client_dp",
                scope=CLIENT_DP_SCOPE,
                accountant=self.config.accountant,
                unit=CLIENT_DP_UNIT,
                rounds=accountant.rounds,
                noise_multiplier=self.config.noise_multiplier,
                clip_norm=self.config.clip_norm,
            )
            report.details["ledger"] = {"dataset_id": ledger.dataset_id, "job_id": ledger.job_id, "epsilon": charged}
        self._log_report(report, fl_ctx)
        return DXO(
            data_kind=DataKind.WEIGHT_DIFF, data=_from_numpy(noised, torch_in), meta=_add_report(dxo.meta, report)
        )

    def _accountant(self, fl_ctx: FLContext) -> ClientDPAccountant:
        if self.client_accountant is None:
            path = _site_state_path(fl_ctx, f"client_dp_{fl_ctx.get_identity_name()}_{fl_ctx.get_job_id()}.json")
            if path is None:
                self.log_warning(fl_ctx, "client-DP: no job id; the round count is kept in memory only")
            self.client_accountant = ClientDPAccountant(config=self.config, state_path=path)
            self.log_info(fl_ctx, f"client-DP accountant: {self.client_accountant.rounds} round(s) so far, {path}")
        return self.client_accountant


@dataclass(frozen=True)
class _LedgerTarget:
    ledger: Any  # privacy.ledger.SiteLedger
    dataset_id: str
    job_id: str


def _site_state_path(fl_ctx: FLContext, name: str) -> Path | None:
    """Where a site keeps per-job privacy state, as the client's DP-SGD does; None outside a job."""
    job_id = fl_ctx.get_job_id()
    if not job_id:
        return None
    folder = site_state()
    if not folder:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        if workspace is None and fl_ctx.get_engine() is not None:
            workspace = fl_ctx.get_engine().get_workspace()
        app_dir = Path(workspace.get_app_dir(job_id)) if workspace is not None else Path.cwd()
        folder = str(app_dir / "privacy_state")
    return Path(folder) / name


def _site_ledger(fl_ctx: FLContext, data_root: str | None) -> _LedgerTarget | None:
    """The site's ledger and the dataset the job's client charges (``<site>/<data folder name>``), if a ledger is set.

    Fail-closed: with a ledger set, a job whose dataset cannot be worked out raises (nothing is sent).
    """
    path = privacy_ledger()
    if not path:
        return None
    from privacy.ledger import SiteLedger

    site, job_id = fl_ctx.get_identity_name(), fl_ctx.get_job_id()
    try:
        if not site or not job_id:
            raise SiteDataError(f"the site or job is unknown (site={site!r}, job={job_id!r})")
        data_dir = site_data_dir(site, data_root)
    except SiteDataError as exc:
        raise ValueError(
            f"client-DP: a privacy ledger is set ({path}) but the dataset to charge is unknown: {exc}; "
            "refusing to send an uncharged update"
        ) from exc
    return _LedgerTarget(SiteLedger(path), site_dataset_id(site, data_dir), f"{job_id}/client_dp")


class FailClosedPercentilePrivacy(PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` that raises instead of passing the update unfiltered. NOT DP.

    Checks its parameters when constructed (job start), filters ``WEIGHT_DIFF`` only (on full weights the
    percentile rule clips every weight and destroys the model), and refuses anything it cannot filter.
    """

    def __init__(self, percentile: float = 10, gamma: float = 0.01, data_kinds: list[str] | None = None) -> None:
        if gamma is None:
            raise ValueError("gamma must be a finite number > 0 (NVFlare's filter always clips)")
        check_percentile_params(percentile=percentile, gamma=gamma)
        if data_kinds not in (None, [DataKind.WEIGHT_DIFF], [str(DataKind.WEIGHT_DIFF.value)]):
            raise ValueError(
                f"data_kinds must be ['WEIGHT_DIFF'] (percentile sharing needs differences), got {data_kinds}"
            )
        super().__init__(percentile=percentile, gamma=gamma, data_kinds=[DataKind.WEIGHT_DIFF])
        # widen the routing so a WEIGHTS or unknown result reaches process_dxo and is refused, not skipped
        self.data_kinds = None
        log.info("FailClosedPercentilePrivacy(percentile=%g, gamma=%g): %s", percentile, gamma, NOT_DP_NOTICE)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code() == ReturnCode.OK:
            try:
                from_shareable(shareable)
            except Exception as exc:
                raise ValueError("FailClosedPercentilePrivacy: the task result is not a DXO; refusing") from exc
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.data_kind in _PASS_KINDS:
            return dxo
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(f"FailClosedPercentilePrivacy got a {dxo.data_kind} result; send weight differences")
        arrays, torch_in = _to_numpy(dxo.data)
        filtered, report = percentile_share(
            arrays, percentile=self.percentile, gamma=self.gamma, num_steps=_num_steps(dxo)
        )
        report.log(log)
        self.log_info(fl_ctx, f"percentile sharing kept {100 * report.fraction_kept:.2f}% ({NOT_DP_NOTICE})")
        return DXO(
            data_kind=DataKind.WEIGHT_DIFF, data=_from_numpy(filtered, torch_in), meta=_add_report(dxo.meta, report)
        )
