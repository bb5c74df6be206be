"""The MONAI Label app object: wires the bundle's model, the checked datastore, tasks and strategies together.

It also closes the holes stock MONAI Label leaves in ``MONAILabelApp.infer``: an ``image`` is a datastore id
(checked, 404 if unknown) or a file this process received as an upload, never an arbitrary path. Sessions are
off (they write outside the studies folder) and MLflow tracking is off (it fails every training run here).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp

from apps.fetal_brain.lib.config import MODEL_NAME, AppConfig
from apps.fetal_brain.lib.datastore import FetalDatastore
from apps.fetal_brain.lib.errors import BadRequestError, NotFoundError
from apps.fetal_brain.lib.infer import FetalBrainSegmentation, label_table
from apps.fetal_brain.lib.model_store import ModelStore
from apps.fetal_brain.lib.prepared import PreparedInputs
from apps.fetal_brain.lib.strategies import EntropyStrategy, RandomStrategy
from apps.fetal_brain.lib.train import FineTune
from apps.fetal_brain.lib.uploads import is_private
from fetalseg.labels import all_labels

log = logging.getLogger(__name__)

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class Activity:
    """How many inferences are running and queued (shown in ``/info/`` so clients see a busy server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.queued = 0

    def enter(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    def leave(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) - 1)

    @contextlib.contextmanager
    def track(self, field: str) -> Iterator[None]:
        self.enter(field)
        try:
            yield
        finally:
            self.leave(field)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"running": self.running, "queued": self.queued}


class FetalBrainApp(MONAILabelApp):
    """Fetal brain tissue segmentation (FeTA labels), corrections, fine-tuning and federated model exchange."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        settings.MONAI_LABEL_TRACKING_ENABLED = False
        self.app_config = AppConfig.from_conf(conf)
        bundle = self.app_config.bundle("inference")
        self.bundle = bundle
        model_path = self.app_config.resolved_model_path(bundle)
        self.store = ModelStore(
            model_path,
            bundle=bundle,
            device=self.app_config.device,
            local_part_path=self.app_config.resolved_local_part_path(bundle),
        )
        self.activity = Activity()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Fetal brain segmentation (FeTA)",
            description="Segments fetal brain T2w MRI into the 7 FeTA tissues; collects corrections for fine-tuning "
            "and federated training",
            version=bundle.version,
            labels={lab.name: lab.value for lab in all_labels()},
        )
        log.info("fetal brain app: model %s, bundle %s, device %s", self.store.path, bundle.version, self.store.device)

    # -- MONAI Label factory hooks --------------------------------------------------------------------------------
    def init_datastore(self) -> FetalDatastore:
        if self.studies.startswith(("http://", "https://")):  # a DICOMweb server (PACS): its MR series, checked
            from apps.fetal_brain.lib.dicomweb_store import open_pacs_datastore

            return open_pacs_datastore(
                self.studies, self.app_config, read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY
            )
        return FetalDatastore(
            self.studies,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, FetalBrainSegmentation]:
        fingerprint = json.dumps(
            {"variant": self.app_config.variant, "overrides": self.app_config.bundle_overrides},
            sort_keys=True,
            default=str,
        )  # what the pre-processing depends on (fixed for a server's life; a key part all the same)
        root = self._datastore.root  # the studies folder, or a PACS datastore's local cache
        self.prepared = PreparedInputs(
            root=root, max_bytes=self.app_config.prepared_cache_bytes, fingerprint=fingerprint
        )
        return {MODEL_NAME: FetalBrainSegmentation(store=self.store, config=self.app_config, prepared=self.prepared)}

    def init_trainers(self) -> dict[str, FineTune]:
        return {MODEL_NAME: FineTune(store=self.store, config=self.app_config)}

    def init_strategies(self) -> dict[str, Any]:
        entropy = EntropyStrategy(task=self._infers[MODEL_NAME], max_candidates=self.app_config.entropy_candidates)
        return {"random": RandomStrategy(), "entropy": entropy}

    def init_scoring_methods(self) -> dict[str, Any]:
        return {}

    def _load_sessions(self, load: bool = False) -> None:
        return None  # sessions store uploads under ~/.cache, outside the studies folder: not offered

    def on_init_complete(self) -> None:
        super().on_init_complete()
        if "apps.fetal_brain.server" not in sys.modules:
            log.warning(
                "started without this app's front (--uvicorn_app apps.fetal_brain.server:app): bad input gets 500s "
                "instead of clear 4xx, uploads are unbounded, and /infer blocks every other request; "
                "use 'fetal-fl app serve' or the command in the README"
            )
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        """Load the model and run one window so the first user's inference does not pay for kernel set-up; then
        prepare the studies (``prepare_on_start``), unlabelled first: those are the ones users open next."""
        task = self._infers[MODEL_NAME]
        try:
            network = self.store.current().network
            roi = tuple(task.default_roi)
            with torch.no_grad():
                network(torch.zeros((1, 1, *roi), device=self.store.device))
        except Exception:  # a broken checkpoint is reported by /info/ and by the first inference
            log.exception("model warm-up failed")
        if not self.app_config.prepare_on_start:
            self.prepared.warm_up["state"] = "off (prepare_on_start false)"
            return
        try:
            store = self.datastore()
            unlabelled = list(store.get_unlabeled_images())
            first = set(unlabelled)
            paths = []
            for image_id in [*unlabelled, *(i for i in store.list_images() if i not in first)]:
                with contextlib.suppress(Exception):  # an id the datastore cannot resolve is its /infer's 4xx
                    paths.append(store.image_file(image_id))
            task.prepare_all(paths)
        except Exception:  # never fatal: requests prepare their own input
            log.exception("preparing the studies at start failed")

    # -- lookups used by the HTTP front ----------------------------------------------------------------------------
    def info_models(self) -> list[str]:
        return sorted(self._infers)

    def strategy_names(self) -> list[str]:
        return sorted(self._strategies)

    def strategy_uses_model(self, name: str) -> bool:
        """Whether a strategy runs the network (unknown: assume it does, so it stays in the bounded pool)."""
        return bool(getattr(self._strategies.get(name), "uses_model", True))

    def trainer_names(self) -> list[str]:
        return sorted(self._trainers)

    def trainer(self, model: str) -> FineTune:
        trainer = self._trainers.get(model)
        if trainer is None:
            raise NotFoundError(f"no train task {model!r}; available: {self.trainer_names()}")
        return trainer

    # -- info -----------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        meta = super().info()
        labels = label_table()
        meta["label_info"] = labels
        meta["label_colors"] = {lab["name"]: lab["color"] for lab in labels}
        meta["model"] = self.store.describe()
        meta["bundle"] = {
            "version": self.bundle.version,
            "pixdim": list(self.bundle.pixdim),
            "patch_size": list(self.bundle.patch_size),
            "num_classes": self.bundle.num_classes,
        }
        meta["inference"] = self.activity.snapshot()
        meta["prepared_inputs"] = self.prepared.stats()
        return meta

    def prefetch(self, image_id: str) -> bool:
        """Pre-process datastore image ``image_id`` in the background (after it is handed out or uploaded)."""
        if hasattr(self.datastore(), "check_image"):  # a PACS: fetching the series is network work, so the caller
            # (the event loop) only starts a thread; the fetch and the pre-processing run there
            threading.Thread(target=self._prefetch_now, args=(image_id,), name="pacs-prefetch", daemon=True).start()
            return True
        return self._prefetch_now(image_id)

    def _prefetch_now(self, image_id: str) -> bool:
        try:
            path = self.datastore().image_file(image_id)
        except Exception:  # an unknown id is the caller's 404, not a prefetch's concern
            return False
        return self._infers[MODEL_NAME].prefetch(path)

    # -- infer ----------------------------------------------------------------------------------------------------
    def resolve_image(self, image: Any) -> tuple[str, str | None]:
        """(path, datastore id or None) for an infer request's ``image``: a known id or one of our uploads."""
        if isinstance(image, str) and os.path.isabs(image):
            if is_private(image) and os.path.exists(image):
                return image, None
            raise BadRequestError("image must be a datastore image id, not a path")
        if not isinstance(image, str):
            raise BadRequestError("image must be a datastore image id")
        return str(self.datastore().image_file(image)), image

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        model = request.get("model")
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            raise NotFoundError(f"no model {model!r}; available: {sorted(self._infers)}")
        path, image_id = self.resolve_image(request.get("image"))
        req = copy.deepcopy(request)
        req.update(image=path, description=task.description, device=self.store.device)
        with self.activity.track("running"):
            result_file, result_json = task(req)
        label_id = None
        wants_save = str(request.get("save_label", "")).lower() in {"1", "true", "yes"}
        if image_id is not None and wants_save and result_file and result_file.endswith(".nii.gz"):
            label_id = self.datastore().save_label(image_id, result_file, "original", {"model": model})
        return {"label": label_id or result_file, "tag": "original", "file": result_file, "params": result_json}
