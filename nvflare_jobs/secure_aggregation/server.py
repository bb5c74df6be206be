"""Server side of secure aggregation in NVFlare: key agreement once per job, unmasking every round.

:class:`SecureAggregationMixin` goes between :class:`nvflare_jobs.controllers.MinClientsMixin` and NVFlare's
``FedAvg``/``FedOpt``: the first time sites are sampled it runs the two key-agreement steps; each training task then
carries the round's participants and the key confirmation; once a round's masked inputs are in (and the
min-clients rule is met) it asks the survivors for their shares and gives :class:`SecureAggregator` the unmasked
mean. Whatever runs after aggregation (FedAvg's update, FedOpt's server optimiser, model selection on the global
metrics, checkpointing, cross-site evaluation) sees an ordinary weight DIFF.

Identity binding: the site name a public key is filed under is the name of the NVFlare client that returned the
task (the controller's own record, ``client_task.client.name``), never the name written inside the message; a
message claiming another site is refused. In POC and provisioned deployments that name is the identity of the
site's mutually authenticated TLS connection (its startup-kit certificate); in the simulator it is the simulated
client's name. The keys are not signed with the startup kit's private key, so the binding rests on the server
relaying them honestly: a server that substitutes a key is caught by the sites' key-confirmation tags and
transcript check (they refuse to train), not prevented.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import (
    WeightedAggregationHelper,
    filter_aggregatable_metrics,
)
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import _get_client_name
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.fedopt_ctl import FedOpt

from nvflare_jobs.controllers import MinClientsMixin
from nvflare_jobs.secure_aggregation import META_KEY, SETUP_TASK, UNMASK_TASK
from privacy.secure_aggregation import Params, ProtocolError, ServerSession, ThresholdError
from privacy.secure_aggregation.fixed_point import DEFAULT_FRAC_BITS


class SecureAggregator(ModelAggregator):
    """Sums masked inputs modulo 2^32 as they arrive; returns the unmasked mean set by the controller.

    Per-site metrics (validation Dice for model selection) are still sent in the clear and averaged unweighted
    (the sites' step counts no longer reach the server).
    """

    expected_data_kind = DataKind.WEIGHT_DIFF

    def __init__(self) -> None:
        super().__init__()
        self.session: ServerSession | None = None
        self._unmasked: dict[str, np.ndarray] | None = None
        self._info: dict[str, Any] = {}
        self._metrics: list[dict[str, Any] | None] = []
        self._round: int | None = None

    def reset_stats(self) -> None:
        self._unmasked, self._info, self._metrics, self._round = None, {}, [], None

    def accept_model(self, model: FLModel) -> None:
        if self.session is None:
            raise ProtocolError("secure aggregation: an update arrived before key agreement")
        site = _get_client_name(model)
        if (model.params_type or ParamsType.DIFF) != ParamsType.DIFF:
            raise ProtocolError(f"secure aggregation: {site} sent {model.params_type}, not a masked DIFF")
        info = (model.meta or {}).get(META_KEY)
        if not isinstance(info, dict):
            raise ProtocolError(f"secure aggregation: {site} sent an update that is not masked: refused")
        self.session.add_masked(site, {"masked": model.params or {}, **info})
        self._round = model.current_round if self._round is None else self._round
        self._metrics.append(model.metrics)

    def set_unmasked(self, params: dict[str, np.ndarray], info: dict[str, Any]) -> None:
        self._unmasked, self._info = params, info

    def aggregate_model(self) -> FLModel:
        if self._unmasked is None:
            raise RuntimeError("secure aggregation: the round's sum was not unmasked")
        params = {k: v.astype(np.float32) for k, v in self._unmasked.items()}
        self._audit(params)
        result = FLModel(
            params=params,
            params_type=ParamsType.DIFF,
            metrics=self._aggregate_metrics(),
            current_round=self._round,
            meta={"secure_aggregation": dict(self._info)},
        )
        self.reset_stats()
        return result

    def _audit(self, params: dict[str, np.ndarray]) -> None:
        """One line in the server's audit file (beside each masked payload's record): the unmasked aggregate."""
        from nvflare_jobs.audit import SERVER_FILE, _workspace_root, append_record, payload_digest

        root = _workspace_root(self.fl_ctx) if self.fl_ctx is not None else None
        if root is None:
            self.warning("secure aggregation: no workspace, the aggregate's digest is not recorded")
            return
        sha, size = payload_digest(params)
        record = {
            "job": self.fl_ctx.get_job_id(),
            "round": self._round,
            "task": "train",
            "site": "(aggregate)",
            "kind": "WEIGHT_DIFF (unmasked mean, secure aggregation)",
            "bytes": size,
            "sha256": sha,
            "survivors": self._info.get("survivors"),
            "dropped": self._info.get("dropped"),
        }
        try:
            append_record(root / "audit" / SERVER_FILE, record)
        except OSError as exc:
            self.error(f"audit: could not record the aggregate: {exc}")

    def _aggregate_metrics(self) -> dict[str, Any] | None:
        helper = WeightedAggregationHelper()
        for i, metrics in enumerate(self._metrics):
            if metrics is None:
                return None
            aggregatable = filter_aggregatable_metrics(metrics)
            if aggregatable:
                helper.add(data=aggregatable, weight=1.0, contributor_name=str(i), contribution_round=self._round)
        return helper.get_result() or None


class SecureAggregationMixin:
    """Controller mixin (MRO: ``MinClientsMixin, SecureAggregationMixin, FedAvg``).

    Args:
        secagg_sites: the job's sites; secagg_threshold: fewest sites a round can unmask with (a strict
            majority); secagg_frac_bits: fixed-point fractional bits; secagg_timeout_s: how long a key-agreement
            or unmasking step waits for the sites (0: no limit).
    """

    def __init__(
        self,
        *args: Any,
        secagg_sites: list[str] | None = None,
        secagg_threshold: int = 2,
        secagg_frac_bits: int = DEFAULT_FRAC_BITS,
        secagg_timeout_s: int = 600,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.secagg_sites = list(secagg_sites or [])
        self.secagg_threshold = int(secagg_threshold)
        self.secagg_frac_bits = int(secagg_frac_bits)
        self.secagg_timeout_s = int(secagg_timeout_s)
        self._secagg: ServerSession | None = None

    # -- key agreement ------------------------------------------------------------------------------------------
    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        clients = super().sample_clients(num_clients)
        if self._secagg is None:
            self._key_agreement(clients)
        assert self._secagg is not None
        usable = [c for c in clients if c in self._secagg.participants()]
        left_out = sorted(set(clients) - set(usable))
        if left_out:
            self.warning(f"secure aggregation: {left_out} have no usable keys in this job and do not train")
        return usable

    def _key_agreement(self, clients: list[str]) -> None:
        job = str(self.fl_ctx.get_job_id())
        params = Params(job, tuple(self.secagg_sites), self.secagg_threshold, self.secagg_frac_bits)
        session = ServerSession(params)
        stated = {"job": job, **params.as_dict()}
        replies = self._ask(SETUP_TASK, {"step": "advertise", **stated}, clients)
        for site, message in replies.items():
            try:
                session.add_public_key(message, authenticated_site=site)
            except ProtocolError as e:
                self.error(f"secure aggregation: key from {site} refused: {e}")
        table = session.key_table()  # raises ThresholdError below the threshold
        replies = self._ask(SETUP_TASK, {"step": "share", "table": table}, sorted(table))
        for site, message in replies.items():
            session.add_setup(message, authenticated_site=site)  # a different transcript stops the job
        missing = sorted(set(table) - set(replies))
        if missing:
            # their peers' shares of their keys exist, theirs of their peers' do not: no round could recover them
            raise ProtocolError(f"secure aggregation: {missing} did not complete key agreement; stopping the job")
        self._secagg = session
        self.aggregator.session = session
        self.info(
            f"secure aggregation: keys agreed with {sorted(table)} (threshold {self.secagg_threshold}, "
            f"transcript {str(session.transcript)[:16]}...)"
        )

    def _ask(
        self, task: str, message: dict[str, Any], targets: list[str], min_responses: int | None = None
    ) -> dict[str, dict[str, Any]]:
        """Send one protocol task to ``targets``, wait (for all, or for ``min_responses`` and then the job's
        ``straggler_wait_s`` for the rest), return each answering site's message by its identity."""
        results = self.broadcast_model(
            task_name=task,
            data=FLModel(params={}, meta={META_KEY: message}),
            targets=list(targets),
            min_responses=len(targets) if min_responses is None else min_responses,
            timeout=self.secagg_timeout_s,
            wait_time_after_min_received=0 if min_responses is None else int(getattr(self, "straggler_wait_s", 0)),
            blocking=True,
        )
        out = {}
        for result in results or []:
            site = (result.meta or {}).get("client_name")  # the controller's record of who answered
            msg = (result.meta or {}).get(META_KEY)
            if site and isinstance(msg, dict):
                out[site] = msg
        return out

    # -- every round --------------------------------------------------------------------------------------------
    def broadcast_model(self, data=None, task_name: str = AppConstants.TASK_TRAIN, targets=None, **kwargs: Any):
        if task_name == getattr(self, "task_name", AppConstants.TASK_TRAIN) and self._secagg is not None:
            parts = sorted(targets or self._secagg.participants())
            self._secagg.start_round(self.current_round, parts)
            conf = self._secagg.confirmation()
            data.meta = dict(data.meta or {})
            data.meta[META_KEY] = {"round": self.current_round, "participants": parts, **conf}
            targets = parts
        return super().broadcast_model(data=data, task_name=task_name, targets=targets, **kwargs)

    def _get_aggregated_result(self) -> FLModel:
        assert self._secagg is not None
        survivors, dropped = self._secagg.survivors()
        try:
            requests = self._secagg.unmask_requests()
        except ThresholdError as e:
            raise RuntimeError(f"secure aggregation: {e}; stopping the job") from None
        # t answers suffice: a survivor dying now costs at most straggler_wait_s, not the round
        replies = self._ask(UNMASK_TASK, {"requests": requests}, survivors, min_responses=self.secagg_threshold)
        try:
            params, weight = self._secagg.finish(replies)
        except ThresholdError as e:
            raise RuntimeError(f"secure aggregation: {e}; stopping the job") from None
        if dropped:
            self.warning(
                f"secure aggregation: round {self.current_round}: {dropped} dropped after masking; their pairwise "
                f"masks were removed with {len(replies)} survivors' shares, and they take no further part in this job"
            )
        self.info(
            f"secure aggregation: round {self.current_round}: unmasked the sum of {len(survivors)} masked updates "
            f"{survivors} (total weight {weight:g})"
        )
        self.aggregator.set_unmasked(params, {"survivors": survivors, "dropped": dropped, "total_weight": weight})
        return super()._get_aggregated_result()


class SecureFetalFedAvg(MinClientsMixin, SecureAggregationMixin, FedAvg):
    """FedAvg / FedProx with :class:`~nvflare_jobs.controllers.MinClientsMixin` rounds and secure aggregation."""


class SecureFetalFedOpt(MinClientsMixin, SecureAggregationMixin, FedOpt):
    """FedOpt (server optimiser on the unmasked mean DIFF) with secure aggregation; as
    :class:`~nvflare_jobs.controllers.FetalFedOpt` for the device and the first step's starting weights."""

    def __init__(self, *args: Any, device: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        self.device = device

    def update_model(self, global_model: Any, aggr_result: Any) -> Any:
        import torch

        state = {k: torch.as_tensor(np.asarray(v)) for k, v in global_model.params.items()}
        self.torch_model.load_state_dict(state, strict=True)
        return super().update_model(global_model, aggr_result)
