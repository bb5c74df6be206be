"""The segmentation task MONAI Label serves: the bundle's model through :class:`fetalseg.inference.Segmenter`.

Why not MONAI Label's transform pipeline: ``Segmenter`` already runs the bundle's pre-processing, its
sliding-window inferer and the inversion back to the input's grid (nearest neighbour, so labels stay 0..7);
this task only adapts it to ``BasicInferTask`` (pre/post transforms are empty, nothing is inverted twice) and
writes the result as NIfTI or ``.seg.nrrd``. Per-request ``sw_overlap``/``roi_size`` build a Segmenter from the
bundle with those overrides (cached), for tuning speed against accuracy. Datastore images are pre-processed once
and kept (:mod:`apps.fetal_brain.lib.prepared`): the pre-processing does not depend on the model or the window.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.errors import BadRequestError
from apps.fetal_brain.lib.model_store import ModelStore
from apps.fetal_brain.lib.prepared import PreparedInputs
from apps.fetal_brain.lib.qc import GA_PARAM, check_result
from apps.fetal_brain.lib.uploads import new_result_path
from apps.fetal_brain.lib.volumes import check_image_header, load_image
from apps.fetal_brain.lib.writers import RESULT_EXTENSIONS, check_extension, present_values, write_result
from fetalseg.inference import Segmentation, Segmenter
from fetalseg.labels import all_labels

log = logging.getLogger(__name__)

_MAX_SEGMENTERS = 4


def label_table() -> list[dict[str, Any]]:
    """The 8 FeTA labels with value, machine name, display name and RGB colour (from the bundle)."""
    return [
        {"value": lab.value, "name": lab.name, "display_name": lab.display_name, "color": list(lab.color)}
        for lab in all_labels()
    ]


def _overlap(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        overlap = float(value)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"sw_overlap must be a number in [0, 0.95], got {value!r}") from exc
    if not 0.0 <= overlap <= 0.95:
        raise BadRequestError(f"sw_overlap must be in [0, 0.95], got {value!r}")
    return overlap


def _roi(value: Any) -> tuple[int, int, int] | None:
    if value is None or value == "" or value == []:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(items) == 1:
        items = items * 3
    try:
        roi = tuple(int(v) for v in items)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"roi_size must be 1 or 3 multiples of 16, got {value!r}") from exc
    if len(roi) != 3 or any(v < 16 or v > 512 or v % 16 for v in roi) or any(float(v) != int(v) for v in items):
        raise BadRequestError(f"roi_size must be 1 or 3 multiples of 16 within 16..512, got {value!r}")
    return roi  # type: ignore[return-value]


class FetalBrainSegmentation(BasicInferTask):
    """Whole-volume FeTA segmentation of one image, returned on the image's own grid."""

    def __init__(self, *, store: ModelStore, config: AppConfig, prepared: PreparedInputs | None = None) -> None:
        self.store = store
        self.app_config = config
        self.prepared = prepared
        inference = config.bundle("inference")  # sliding-window defaults live in the bundle's inference.json
        self.default_overlap = float(inference.get("sw_overlap"))
        self.default_roi = tuple(config.infer_roi_size or (int(v) for v in inference.get("sw_roi_size")))
        super().__init__(
            path=str(store.path),
            network=None,
            type=InferType.SEGMENTATION,
            labels={lab.name: lab.value for lab in all_labels()},
            dimension=3,
            description="Fetal brain tissue segmentation (FeTA labels 0..7), result on the input's grid",
            config={"result_extension": list(RESULT_EXTENSIONS), "sw_overlap": self.default_overlap},
        )
        self._segmenters: OrderedDict[tuple, Segmenter] = OrderedDict()
        self._lock = threading.Lock()

    # -- MONAI Label hooks ----------------------------------------------------------------------------------------
    def is_valid(self) -> bool:
        return True  # an untrained model is still served (and says so in info())

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["model"] = self.store.describe()
        out["label_info"] = label_table()
        out["roi_size"] = list(self.default_roi)
        return out

    def pre_transforms(self, data=None) -> list:
        return []  # the bundle's pre-processing runs inside Segmenter

    def inverse_transforms(self, data=None) -> None:
        return None  # Segmenter already inverted to the input grid; None = nothing more to invert

    def post_transforms(self, data=None) -> list:
        return []

    # -- inference ------------------------------------------------------------------------------------------------
    def segmenter(self, *, overlap: float | None = None, roi: tuple[int, int, int] | None = None) -> Segmenter:
        """A Segmenter for the current model and these sliding-window settings (cached, rebuilt on reload)."""
        loaded = self.store.current()
        overlap = self.default_overlap if overlap is None else overlap
        roi = tuple(self.default_roi) if roi is None else tuple(roi)
        key = (id(loaded.network), loaded.stamp, overlap, roi)
        with self._lock:
            segmenter = self._segmenters.get(key)
            if segmenter is None:
                bundle = self.app_config.bundle("inference", sw_overlap=overlap, sw_roi_size=list(roi))
                segmenter = Segmenter(loaded.network, bundle=bundle, device=self.store.device)
                self._segmenters[key] = segmenter
                while len(self._segmenters) > _MAX_SEGMENTERS:
                    self._segmenters.popitem(last=False)
            self._segmenters.move_to_end(key)
            return segmenter

    def segment(
        self, image: str | Path, *, overlap: float | None = None, roi: Any = None, with_probabilities: bool = False
    ) -> Segmentation:
        """Segment one image path (file or DICOM folder); bad input becomes :class:`UnprocessableError`."""
        check_image_header(image)
        segmenter = self.segmenter(overlap=_overlap(overlap), roi=_roi(roi))
        try:
            if self.prepared is None:
                data = segmenter.preprocess(str(image))
            else:
                data = self.prepared.get(image, segmenter.preprocess)
            return segmenter.segment_prepared(data, with_probabilities=with_probabilities)
        except Exception:
            load_image(image)  # a corrupt input raises UnprocessableError with the reason; a server bug re-raises below
            raise

    def _prepare(self, path: str) -> dict[str, Any]:
        """What a background thread computes for a study (callers may be on the event loop: never call it there)."""
        check_image_header(path)
        return self.segmenter().preprocess(path)

    def prefetch(self, image: str | Path) -> bool:
        """Pre-process a datastore image in the background so its next /infer only runs the network; True if
        queued (False: cache off, already kept or pending, or not a datastore file). Errors wait for the /infer."""
        if self.prepared is None:
            return False
        return self.prepared.prefetch(image, self._prepare)

    def prepare_all(self, images: list[str | Path]) -> None:
        """Prepare ``images`` (datastore files, in order) on the lowest-priority thread until the budget is full."""
        if self.prepared is not None:
            self.prepared.warm(images, self._prepare)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict:
        image = data.get(self.input_key)
        if not isinstance(image, str):
            raise BadRequestError("inference needs an image path")
        seg = self.segment(image, overlap=data.get("sw_overlap"), roi=data.get("roi_size"))
        data["pred"] = seg.label
        data["pred_affine"] = seg.affine
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        requested = extension or data.get("result_extension") or RESULT_EXTENSIONS[0]
        if isinstance(requested, (list, tuple)):
            requested = requested[0]
        try:
            ext = check_extension(requested)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        label = data["pred"]
        path = write_result(label, data["pred_affine"], new_result_path(ext))
        model = self.store.describe()
        summary = {
            "format": ext,
            "shape": [int(s) for s in label.shape],
            "label_values": present_values(label),
            "model": {k: model.get(k) for k in ("bundle_version", "trained", "origin", "job_id", "round", "sha256")},
            "qc": check_result(label, data["pred_affine"], image=data.get("image"), requested=data.get(GA_PARAM)),
        }
        return str(path), summary
