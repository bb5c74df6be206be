"""FedAvg / FedOpt workflows that train on every connected site and survive losing some of them.

NVFlare's ``FedAvg`` controller samples ``min_clients`` sites per round (a random subset when more are
connected) and waits for every one of them; a single site that dies or whose update is rejected by
:class:`nvflare_jobs.guard.UpdateGuard` then stops the job. Hospitals want the opposite: every connected
site trains each round, and the round completes with the others as long as at least ``min_clients`` valid
updates arrived. These subclasses change only that (targets, ``min_responses``, how long to wait for
stragglers) and log which sites were left out; aggregation, persistence and model selection stay NVFlare's.

Failed or rejected results are judged here, not by NVFlare's "dynamic" error mode: that mode may abort the run
from the result thread while the round is still being closed, so whether the job stopped with its reason logged
depended on thread timing. Here a failure is logged; once ``min_clients`` valid updates can no longer arrive the
round's task is cancelled, and the round ends in :meth:`MinClientsMixin._get_aggregated_result`, which always
states why the job stops.
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.base_fedavg import _get_client_name
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.fedopt_ctl import FedOpt


class MinClientsMixin:
    """Round semantics for a hospital federation: all sites train, ``min_clients`` valid updates suffice.

    Args:
        min_clients: fewest valid updates a round may aggregate; fewer stops the job with an error.
        straggler_wait_s: once ``min_clients`` results are in, how long to wait for the remaining sites.
        task_timeout_s: hard limit for one training round per site (0 = none).
    """

    def __init__(self, *args: Any, min_clients: int = 1, straggler_wait_s: int = 60, task_timeout_s: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if straggler_wait_s < 0 or task_timeout_s < 0:
            raise ValueError("straggler_wait_s and task_timeout_s must be >= 0")
        self.min_clients = int(min_clients)
        self.straggler_wait_s = int(straggler_wait_s)
        self.task_timeout_s = int(task_timeout_s)
        self._round_targets: list[str] = []
        self._round_accepted: list[str] = []
        self._round_failed: set[str] = set()
        self._round_task = None
        self._ignore_result_error = True  # failures are judged by _accept_train_result below, never by a panic

    def run(self) -> None:
        """A continuation of a job a server restart abandoned (:mod:`nvflare_jobs.resume`, from the job meta)
        starts at the rounds done, runs the rounds left and starts from that job's last global model."""
        from nvflare_jobs.resume import server_resume_record

        self._resume = server_resume_record(self.fl_ctx)
        if self._resume is not None:
            start = int(self._resume["start_round"])
            if not 1 <= start < self.num_rounds:
                raise RuntimeError(f"cannot resume at round {start} of {self.num_rounds}")
            self.info(
                f"resuming job {self._resume['abandoned_job']} at round {start} of {self.num_rounds} from "
                f"{self._resume['model']}"
            )
            self.start_round, self.num_rounds, self.model = start, self.num_rounds - start, None
        super().run()

    def load_model(self) -> FLModel:
        model = super().load_model()
        if getattr(self, "_resume", None) is not None and model is not None:
            from nvflare_jobs.resume import load_resumed_params

            model.params = load_resumed_params(self._resume["model"], model.params, self.start_round)
        return model

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        clients = super().sample_clients(None)  # every connected site, never a random subset
        if len(clients) < self.min_clients:
            raise RuntimeError(
                f"only {len(clients)} site(s) connected {clients}, fewer than min_clients={self.min_clients}"
            )
        return clients

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        if task_name == getattr(self, "task_name", "train"):
            self._round_targets = list(targets or [])
            self._round_accepted = []
            self._round_failed = set()
            n_targets = len(targets) if targets else len(self.engine.get_clients())
            min_responses = min(self.min_clients, n_targets)
            timeout = self.task_timeout_s
        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=min_responses,
            timeout=timeout,
            wait_time_after_min_received=self.straggler_wait_s,
            blocking=False,
            callback=callback,
        )

    def _prepare_task(self, data, task_name, timeout, callback):
        task = super()._prepare_task(data=data, task_name=task_name, timeout=timeout, callback=callback)
        if task_name == getattr(self, "task_name", "train"):
            self._round_task = task
        return task

    def _accept_train_result(
        self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False
    ) -> bool:
        rc = result.get_return_code()
        if is_unknown_task or rc in (None, ReturnCode.OK):
            return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        self.fl_ctx = fl_ctx
        self._round_failed.add(client_name)
        can_still = sorted(set(self._round_targets) - self._round_failed)
        self.warning(
            f"round {self.current_round}: no valid update from {client_name} (return code {rc}); "
            f"{len(can_still)} site(s) may still send one {can_still}"
        )
        if len(can_still) < self.min_clients and self._round_task is not None:
            self.warning(
                f"round {self.current_round}: fewer than min_clients={self.min_clients} valid updates can arrive; "
                "closing the round"
            )
            self.cancel_task(self._round_task)
        return False

    def _aggregate_one_result(self, result: FLModel) -> bool:
        accepted = super()._aggregate_one_result(result)
        if accepted:
            self._round_accepted.append(_get_client_name(result))
        return accepted

    def _get_aggregated_result(self) -> FLModel:
        missing = sorted(set(self._round_targets) - set(self._round_accepted))
        n_ok = len(self._round_accepted)
        if n_ok < self.min_clients:
            raise RuntimeError(
                f"round {self.current_round}: only {n_ok} valid update(s) {sorted(self._round_accepted)}, fewer than "
                f"min_clients={self.min_clients} (missing or rejected: {missing}); stopping the job"
            )
        if missing:
            self.warning(
                f"round {self.current_round}: continuing with {n_ok} of {len(self._round_targets)} sites "
                f"{sorted(self._round_accepted)}; no valid update from {missing} "
                f"(min_clients={self.min_clients} allows it)"
            )
        else:
            self.info(f"round {self.current_round}: aggregating updates from all {n_ok} sites")
        return super()._get_aggregated_result()


class FetalFedAvg(MinClientsMixin, FedAvg):
    """NVFlare ``FedAvg`` (FedProx when ``fedprox_mu`` is set) with :class:`MinClientsMixin` rounds."""


class FetalFedOpt(MinClientsMixin, FedOpt):
    """NVFlare's ``FedOpt`` (server-side optimiser on the averaged DIFF) with :class:`MinClientsMixin` rounds.

    ``device`` stays the plain string given (or None: the model's own device, the CPU): NVFlare's ``FedOpt``
    stores a ``torch.device``, which its job exporter cannot write into a config.
    """

    def __init__(self, *args: Any, device: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        self.device = device

    def update_model(self, global_model: Any, aggr_result: Any) -> Any:
        """NVFlare's FedOpt steps its own copy of the network from that copy's weights; they are set to the
        current global model first, so the first step starts from the persistor's initial model (e.g. a
        pretrained ``initial_checkpoint``), not from the controller's freshly built network. After the first
        round the two are equal and this copies nothing new."""
        import numpy as np
        import torch

        state = {k: torch.as_tensor(np.asarray(v)) for k, v in global_model.params.items()}
        self.torch_model.load_state_dict(state, strict=True)
        return super().update_model(global_model, aggr_result)
