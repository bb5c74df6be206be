"""Fine-tune the served model on the site's corrected cases (datastore ``final`` labels) and publish it.

The training loop is the project's one loop (:func:`fetalseg.training.fit`, which the NVFlare client also runs),
not MONAI Label's ignite trainer: same transforms, loss and optimizer as federated training, and no MLflow. The
model is validated before and after; with ``publish="if_better"`` (default) a fine-tuned model replaces the
served one only if its validation Dice is at least the current model's. Publishing goes through
:class:`~apps.fetal_brain.lib.model_store.ModelStore` (atomic replace), so an inference running meanwhile uses
one whole model. The outcome is written to ``train_stats.json`` next to the model and shown in ``/info/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from apps.fetal_brain.lib.config import PUBLISH_POLICIES, AppConfig
from apps.fetal_brain.lib.errors import BadRequestError, InputError, UnprocessableError
from apps.fetal_brain.lib.model_store import ModelStore, utc_now
from apps.fetal_brain.lib.volumes import load_label_for
from fetalseg.data.loaders import Case, split_cases
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import nanmean
from fetalseg.plumbing import atomic_write_text
from fetalseg.training import fit

log = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"
# keys MONAI Label adds to a train request itself
_FRAMEWORK_KEYS = {"model", "local_rank", "gpus", "bundle_path", "client_id", "device", "multi_gpu", "dataset"}
_LIMITS: dict[str, tuple[type, float, float]] = {
    "max_epochs": (int, 1, 10000),
    "time_budget_s": (float, 1, 7 * 24 * 3600),
    "val_fraction": (float, 0.0, 0.9),
    "val_interval": (int, 1, 1000),
    "learning_rate": (float, 1e-7, 1.0),
    "seed": (int, 0, 2**31 - 1),
}


class FineTune(TrainTask):
    """MONAI Label train task: fine-tune the current model on corrected cases, then publish it atomically."""

    def __init__(self, *, store: ModelStore, config: AppConfig) -> None:
        super().__init__("Fine-tune the served model on the corrected cases (datastore final labels)")
        self.store = store
        self.app_config = config
        self.stats_path = store.path.parent / STATS_FILE

    def config(self) -> dict[str, Any]:
        return {
            "max_epochs": 10,
            "time_budget_s": 1800.0,
            "val_fraction": 0.25,
            "val_interval": 1,
            "learning_rate": 0.0005,
            "publish": self.app_config.train_publish,
            "seed": 0,
        }

    def validate(self, request: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults merged with ``request``; :class:`BadRequestError` for unknown keys or out-of-range values."""
        if request is None:
            request = {}
        if not isinstance(request, dict):
            raise BadRequestError(f"train parameters must be a JSON object, got {type(request).__name__}")
        params = self.config()
        unknown = sorted(set(request) - set(params) - _FRAMEWORK_KEYS)
        if unknown:
            raise BadRequestError(f"unknown train parameters {unknown}; known: {sorted(params)}")
        for key, (kind, low, high) in _LIMITS.items():
            if key not in request or request[key] is None:
                continue
            value = request[key]
            if isinstance(value, bool):
                raise BadRequestError(f"{key} must be a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise BadRequestError(f"{key} must be a number, got {value!r}") from exc
            if not math.isfinite(number) or not low <= number <= high or (kind is int and number != int(number)):
                raise BadRequestError(f"{key} must be {'a whole number ' if kind is int else ''}in [{low}, {high}]")
            params[key] = kind(number)
        if "publish" in request:
            if request["publish"] not in PUBLISH_POLICIES:
                raise BadRequestError(f"publish must be one of {PUBLISH_POLICIES}, got {request['publish']!r}")
            params["publish"] = request["publish"]
        return params

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write_text(self.stats_path, json.dumps(stats, indent=2, default=str))

    def cases(self, datastore: Any) -> tuple[list[Case], list[str]]:
        """Corrected cases that pass validation, and a sentence for each one skipped."""
        cases, skipped = [], []
        for image_id, image, label in datastore.final_cases():
            try:
                load_label_for(image, label)
            except InputError as exc:
                skipped.append(f"{image_id}: {exc}")
                continue
            cases.append(Case(case_id=image_id, image=image, label=label, site="local"))
        return cases, skipped

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        params = self.validate(request)
        start = time.perf_counter()
        stats: dict[str, Any] = {"status": "running", "started": utc_now(), "pid": os.getpid(), "params": params}
        self._write_stats(stats)
        try:
            result = self._run(params, datastore, stats)
        except Exception as exc:
            stats.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=utc_now())
            self._write_stats(stats)
            raise
        result.update(status="done", finished=utc_now(), seconds=round(time.perf_counter() - start, 1))
        self._write_stats(result)
        return result

    def _run(self, params: dict[str, Any], datastore: Any, stats: dict[str, Any]) -> dict[str, Any]:
        cases, skipped = self.cases(datastore)
        if skipped:
            log.warning("skipping %d invalid corrected cases: %s", len(skipped), skipped)
        if not cases:
            raise UnprocessableError("no usable corrected cases (images with a 'final' label) to fine-tune on")
        if len(cases) >= 2 and params["val_fraction"] > 0:
            train, val = split_cases(cases, val_fraction=params["val_fraction"], seed=params["seed"])
            on_train = False
        else:
            train, val, on_train = cases, cases, True
        bundle = self.app_config.bundle("train", learning_rate=params["learning_rate"])
        current = self.store.current()
        baseline_scores = evaluate_cases(current.network, val, bundle=bundle, device=self.store.device, with_hd95=False)
        baseline = nanmean(s.mean_dice for s in baseline_scores)
        network = copy.deepcopy(current.network)
        model, fit_result = fit(
            bundle,
            train,
            val,
            max_epochs=params["max_epochs"],
            time_budget_s=params["time_budget_s"],
            val_interval=params["val_interval"],
            network=network,
            seed=params["seed"],
        )
        dice = fit_result.best_mean_dice
        better = math.isnan(baseline) or (not math.isnan(dice) and dice >= baseline)
        publish = params["publish"] == "always" or better
        stats.update(
            n_train=len(train),
            n_val=len(val),
            validated_on_training_cases=on_train,
            skipped=skipped,
            epochs_run=fit_result.epochs_run,
            best_epoch=fit_result.best_epoch,
            val_mean_dice=dice,
            baseline_val_mean_dice=baseline,
            history=fit_result.history,
            published=publish,
        )
        if publish:
            parent = {k: current.info.get(k) for k in ("origin", "job_id", "round", "sha256") if k in current.info}
            described = self.store.publish(
                model.cpu(),
                origin="local-finetune",
                parent=parent or {"origin": "untrained"},
                val_mean_dice=dice,
                baseline_val_mean_dice=baseline,
                n_train=len(train),
                n_val=len(val),
                epochs=fit_result.epochs_run,
                trained_at=utc_now(),
            )
            stats["model_sha256"] = described.get("sha256")
            log.info("published fine-tuned model: val Dice %.4f (was %.4f)", dice, baseline)
        else:
            stats["not_published_because"] = f"validation Dice {dice:.4f} < current model's {baseline:.4f}"
            log.info("kept the current model: %s", stats["not_published_because"])
        return stats
