"""Write the best global model in the bundle's checkpoint format, so the MONAI Label app can install it.

NVFlare's own persistor keeps ``best_FL_global_model.pt`` in its own format (``net.``-prefixed keys, training
config). This server widget listens for the same "new best global model" event NVFlare's model selector fires
(selection on ``val_mean_dice``: the sites' Dice of the received global model on their validation cases) and
writes ``fetal_brain_best.pt`` next to it with :func:`fetalseg.bundle.save_checkpoint`: the bundle's key names
plus ``origin="nvflare"``, the job id, the round and the validation Dice, and a ``.json`` sidecar with the same
facts. ``nvflare job download`` brings both back with the server's workspace.

The model produced by the LAST round is never scored during training (sites score what they receive), so when
cross-site evaluation ran, the writer compares the final and the best global model on every site's validation
cases (case-weighted mean ``val_mean_dice``) and keeps the final one if it is better. The held-out test cases
(``test_*`` in the same results) are reported, never used to choose.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants, DefaultCheckpointFileName
from nvflare.app_common.app_event_type import AppEventType

from fetalseg.bundle import load_checkpoint_file
from fetalseg.plumbing import atomic_write_text
from nvflare_jobs.fetal_brain.model import save_bundle_checkpoint

BEST_CHECKPOINT_NAME = "fetal_brain_best.pt"


def refuse_local_parts(path: str | Path) -> None:
    """Raise ``ValueError`` if the checkpoint at ``path`` holds a site's local part (the part file itself, a model
    with one merged in, or the app's own fine-tune): such weights were learned without DP and never leave the site,
    so they must not become a job's initial model that every site receives."""
    from fetalseg.local_part import NEVER_SENT, holds_local_parts

    try:
        ckpt = load_checkpoint_file(path)
    except Exception:  # not a loadable checkpoint: the job build's own check says why (write_initial_model)
        return
    info = {k: v for k, v in ckpt.items() if k != "model"} if isinstance(ckpt, Mapping) else {}
    if holds_local_parts(info):
        raise ValueError(
            f"{path} holds a site's local part ({NEVER_SENT}: learned without DP at {info.get('site', 'a site')}); "
            "it cannot be shipped with a job. Use the shared global checkpoint (e.g. fetal_brain_best.pt)"
        )


CSE_PREFIX = "SRV_"  # how CrossSiteModelEval names the server's models


def cross_site_score(results: Mapping[str, Mapping[str, Any]], *, key: str = "val_mean_dice") -> float:
    """Case-weighted mean of ``key`` over sites (``{site: metrics}``); NaN when no site reported a number."""
    total, weight = 0.0, 0.0
    for metrics in results.values():
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        n = metrics.get("val_cases", 1.0)
        n = float(n) if isinstance(n, (int, float)) and n > 0 else 1.0
        total += value * n
        weight += n
    return total / weight if weight else float("nan")


class BundleCheckpointWriter(FLComponent):
    """Server component: keeps ``fetal_brain_best.pt`` (bundle format) equal to the best global model so far.

    Args:
        bundle_overrides: the job's bundle overrides (the network must be built exactly as the clients build it).
        file_name: checkpoint file name inside the server's app folder.
        key_metric: the metric the model selector ranks on (recorded with the score).
        initialized_from: provenance of the job's initial checkpoint (file, SHA-256 prefix), recorded with every model
            written (None: the job started from fresh weights).
    """

    def __init__(
        self,
        bundle_overrides: Mapping[str, Any] | None = None,
        file_name: str = BEST_CHECKPOINT_NAME,
        key_metric: str = "val_mean_dice",
        initialized_from: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not file_name or os.path.basename(file_name) != file_name or not file_name.endswith(".pt"):
            raise ValueError(f"file_name must be a plain '*.pt' file name, got {file_name!r}")
        self.bundle_overrides = dict(bundle_overrides or {})
        self.file_name = file_name
        self.key_metric = key_metric
        self.initialized_from = dict(initialized_from) if initialized_from else None
        self._cse: dict[str, dict[str, dict[str, Any]]] = {}
        self._last_round = -1
        self._written: dict[str, Any] | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._cse, self._last_round, self._written = {}, -1, None
            path = self._path(fl_ctx)
            for stale in (path, path.with_suffix(".json")):
                if stale.exists():
                    stale.unlink()
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._last_round = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            self._on_new_best(fl_ctx)
        elif event_type == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._record_cross_site(fl_ctx)
        elif event_type == EventType.END_RUN:
            self._prefer_final_model(fl_ctx)

    # ------------------------------------------------------------------------------------------------------
    def _path(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())) / self.file_name

    def _save(self, fl_ctx: FLContext, weights: Mapping[str, Any], info: dict[str, Any]) -> None:
        info = {"origin": "nvflare", "job_id": fl_ctx.get_job_id(), **info, "key_metric": self.key_metric}
        if self.initialized_from:
            info["initialized_from"] = self.initialized_from
        try:
            path = save_bundle_checkpoint(weights, self._path(fl_ctx), bundle_overrides=self.bundle_overrides, **info)
        except Exception as e:  # a failed write must be loud but must not kill the training run
            self.log_exception(fl_ctx, f"could not write the bundle checkpoint: {e}")
            return
        sidecar = {**info, "bundle_overrides": self.bundle_overrides, "checkpoint": path.name}
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2))
        self._written = info
        score = info[self.key_metric]
        self.log_info(
            fl_ctx,
            f"bundle checkpoint {path}: global model after {info['round']} round(s), "
            f"{self.key_metric}={'not scored' if score is None else f'{score:.4f}'} ({info['selected_by']})",
        )

    def _on_new_best(self, fl_ctx: FLContext) -> None:
        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if not learnable:
            self.log_error(fl_ctx, "a new best model was announced but no global model is available; not written")
            return
        selection = fl_ctx.get_prop(AppConstants.METRICS_SELECTION_INFO) or {}
        best = selection.get("best_metrics", {}) if isinstance(selection, Mapping) else {}
        score = best.get(self.key_metric, fl_ctx.get_prop(AppConstants.VALIDATION_RESULT))
        info = {
            # the global model after `round` aggregations, scored by the sites when they received it
            "round": int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0),
            self.key_metric: float(score) if isinstance(score, (int, float)) else float("nan"),
            "selected_by": "validation during training",
        }
        self._save(fl_ctx, learnable[ModelLearnableKey.WEIGHTS], info)

    def _record_cross_site(self, fl_ctx: FLContext) -> None:
        owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER)
        site = fl_ctx.get_prop(AppConstants.DATA_CLIENT)
        result = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
        if not owner or not site or result is None:
            return
        try:
            dxo = from_shareable(result)
        except Exception:
            return
        if dxo.data_kind == DataKind.METRICS and isinstance(dxo.data, Mapping):
            self._cse.setdefault(str(owner), {})[str(site)] = dict(dxo.data)

    def _prefer_final_model(self, fl_ctx: FLContext) -> None:
        final = self._cse.get(CSE_PREFIX + DefaultCheckpointFileName.GLOBAL_MODEL)
        if not final:
            if self._written is None:  # no Dice ever arrived (DP sites withhold them): keep the last round's model
                self._save_last_round(fl_ctx)
            return
        best = self._cse.get(CSE_PREFIX + DefaultCheckpointFileName.BEST_GLOBAL_MODEL, {})
        final_score = cross_site_score(final, key=self.key_metric)
        best_score = cross_site_score({s: best[s] for s in final if s in best}, key=self.key_metric)
        self.log_info(
            fl_ctx, f"cross-site {self.key_metric}: final global model {final_score:.4f}, best so far {best_score:.4f}"
        )
        if self._written is not None and not final_score > best_score:
            return
        if self._written is None and not math.isfinite(final_score):  # no Dice at all (DP sites withhold them)
            self._save_last_round(fl_ctx)
            return
        weights = self._final_global_weights(fl_ctx, "bundle checkpoint not updated")
        if weights is None:
            return
        info = {
            "round": self._last_round + 1,
            self.key_metric: final_score,
            "selected_by": "cross-site evaluation (final model beat the best during training)",
            "cross_site": {site: m.get(self.key_metric) for site, m in final.items()},
        }
        self._save(fl_ctx, weights, info)

    def _final_global_weights(self, fl_ctx: FLContext, consequence: str) -> Mapping[str, Any] | None:
        """The weights of NVFlare's persisted final global model (``FL_global_model.pt``), or None (logged).

        Read with ``weights_only=True`` like every checkpoint (:func:`fetalseg.bundle.load_checkpoint_file`):
        NVFlare's ``PTFileModelPersistor`` writes ``{"model": OrderedDict of tensors, "meta_props": dict,
        "train_conf": dict}`` of plain values (checked on 43 files written by NVFlare 2.9 simulator, POC and
        provisioned runs, FedAvg/FedOpt/FedProx/DP jobs) and reads it back with ``weights_only=True`` itself, so no
        ``add_safe_globals`` allow-list is needed.
        """
        source = self._path(fl_ctx).with_name(DefaultCheckpointFileName.GLOBAL_MODEL)
        if not source.is_file():
            self.log_error(fl_ctx, f"final global model {source} not found; {consequence}")
            return None
        return load_checkpoint_file(source)["model"]

    def _save_last_round(self, fl_ctx: FLContext) -> None:
        """No site sent a validation Dice (DP-SGD sites withhold data-dependent metrics unless they are noised and
        accounted, docs/privacy.md): there is nothing to select on, so the last round's global model is kept."""
        weights = self._final_global_weights(fl_ctx, "no bundle checkpoint written")
        if weights is None:
            return
        info = {
            "round": self._last_round + 1,
            self.key_metric: None,  # not scored (JSON null: a NaN would break every JSON reader of the metadata)
            "selected_by": "last round (no validation metric received: the sites withhold them under DP-SGD)",
        }
        self._save(fl_ctx, weights, info)
