"""Active learning: which unlabelled case should the radiologist correct next.

``random`` weights cases as MONAI Label's own strategy does (the longer since a case was last handed out, the
likelier), plus one second, so it never fails: stock MONAI Label 0.8.5 answers 500 ("Total of weights must be
greater than zero") when every unlabelled case was handed out within the current second, e.g. the only case
left asked for twice, and on a clock that went back. ``entropy`` runs the served model on unlabelled images and
picks the one whose tissue prediction is least certain: the mean softmax entropy over voxels the model calls
brain (background voxels, certain and numerous, would otherwise drown the signal). Scores are cached per image
file and model version, so asking again after one correction only scores what changed.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from apps.fetal_brain.lib.errors import BadRequestError, InputError
from apps.fetal_brain.lib.infer import FetalBrainSegmentation

log = logging.getLogger(__name__)


def foreground_entropy(probabilities: np.ndarray) -> float:
    """Mean normalised entropy (0..1) of the voxels whose most likely class is not background."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / math.log(p.shape[0])
    foreground = np.argmax(p, axis=0) > 0
    if not foreground.any():
        return 1.0  # the model finds no brain at all: maximally worth a look
    return float(entropy[foreground].mean())


def recency_weights(last_served: list[float], now: float) -> list[float]:
    """Sampling weight per case: seconds since it was last handed out (never: ``now``), plus 1, never below 1."""
    return [max(now - ts, 0.0) + 1.0 for ts in last_served]


class RandomStrategy(Strategy):
    """Random unlabelled case; cases not handed out for a while are likelier (see the module docstring)."""

    uses_model = False  # runs no network: served outside the inference pool (never queued behind inferences)

    def __init__(self) -> None:
        super().__init__("Random unlabelled case (those not handed out recently more likely)")

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any] | None:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        strategy = request.get("strategy", "random")
        served = []
        for image in images:
            info = datastore.get_image_info(image).get("strategy", {}).get(strategy, {})
            ts = info.get("ts", 0) if isinstance(info, dict) else 0
            served.append(float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0)
        weights = recency_weights(served, time.time())
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}


class EntropyStrategy(Strategy):
    """Next sample = the unlabelled image with the highest foreground prediction entropy."""

    uses_model = True  # segments candidates: runs in the bounded inference pool

    def __init__(self, *, task: FetalBrainSegmentation, max_candidates: int = 8) -> None:
        super().__init__("Least certain unlabelled case (softmax entropy of the current model)")
        self.task = task
        self.max_candidates = int(max_candidates)
        self._scores: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"description": self.description, "max_candidates": self.max_candidates}

    def _key(self, image_id: str, path: str) -> tuple:
        st = os.stat(path)
        return (image_id, st.st_ino, st.st_mtime_ns, st.st_size, self.task.store.stamp())

    def score(self, image_id: str, path: str) -> float:
        """Uncertainty of one image under the current model (cached)."""
        key = self._key(image_id, path)
        with self._lock:
            if key in self._scores:
                return self._scores[key]
        seg = self.task.segment(path, with_probabilities=True)
        value = foreground_entropy(seg.probabilities)
        with self._lock:
            self._scores[key] = value
        return value

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any] | None:
        limit = request.get("max_candidates", self.max_candidates)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise BadRequestError(f"max_candidates must be a whole number in 1..1000, got {limit!r}")
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        rng = random.Random(int(request.get("seed", 0)) if str(request.get("seed", 0)).isdigit() else 0)
        candidates = images if len(images) <= limit else sorted(rng.sample(images, limit))
        best: tuple[float, str] | None = None
        skipped = []
        for image_id in candidates:
            try:
                path = str(datastore.image_file(image_id))
                value = self.score(image_id, path)
            except InputError as exc:
                skipped.append(f"{image_id}: {exc}")
                continue
            if best is None or value > best[0]:
                best = (value, image_id)
        if skipped:
            log.warning("entropy strategy skipped unreadable images: %s", skipped)
        if best is None:
            return None
        return {"id": best[1], "entropy": best[0], "candidates": len(candidates), "skipped": skipped}
