"""Whole-volume segmentation with the bundle's pre-processing, sliding-window inferer and inversion.

The result is returned on the input's own voxel grid (same shape, affine, orientation, spacing) because a
radiologist's viewer, the metrics and the datastore all compare against the original file, not the model's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from fetalseg.bundle import Bundle


@dataclass
class Segmentation:
    """Label map (uint8, input's voxel grid) with the input's affine; ``probabilities`` only when asked for."""

    label: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = None


class Segmenter:
    """Runs one network over whole volumes; reuse it (transforms and inferer are built once)."""

    def __init__(self, network: torch.nn.Module, *, bundle: Bundle | None = None, device: str | torch.device = "cpu"):
        self.bundle = bundle or Bundle("common")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = self.bundle.preprocessing()
        self.inferer = self.bundle.inferer()
        self._invert = Invertd(
            keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True
        )

    def preprocess(self, image: str | Path | dict[str, Any]) -> dict[str, Any]:
        item = {"image": str(image)} if isinstance(image, (str, Path)) else dict(image)
        return self.preprocessing(item)

    @torch.no_grad()
    def logits(self, data: dict[str, Any]) -> torch.Tensor:
        """Raw network output (1, C, X, Y, Z) on the model grid for pre-processed ``data``."""
        image = data["image"]
        batch = image.as_tensor()[None] if isinstance(image, MetaTensor) else torch.as_tensor(image)[None]
        return self.inferer(batch.to(self.device), self.network)

    def segment(self, image: str | Path | dict[str, Any], *, with_probabilities: bool = False) -> Segmentation:
        """Segment one volume (path or datalist item) and return labels on the input's grid."""
        data = self.preprocess(image)
        logits = self.logits(data)
        pred = torch.argmax(logits, dim=1, keepdim=True)[0].to(torch.uint8).cpu()
        probabilities = torch.softmax(logits, dim=1)[0].cpu().numpy() if with_probabilities else None
        label, affine = self.to_input_space(data, pred)
        return Segmentation(label=label, affine=affine, probabilities=probabilities)

    def to_input_space(self, data: dict[str, Any], pred: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Undo the pre-processing's orientation and resampling on a label map ``pred`` (1, X, Y, Z, model grid)."""
        data = dict(data)
        data["pred"] = MetaTensor(pred)  # Invertd copies the image's transform trace onto a MetaTensor
        inverted = self._invert(data)["pred"]
        label = np.asarray(inverted.detach().cpu().numpy()[0]).round().astype(np.uint8)
        affine = np.asarray(data["image"].meta.get("original_affine", data["image"].affine), dtype=float)
        return label, affine
