"""Domain randomization for public pretraining: the one transform MONAI lacks, a per-tissue contrast remap.

Why: the federation's sites differ by acquisition (tissue contrast, gamma, blur, resolution, bias field, noise),
and the public model is trained on one more site with its own profile. A model that has seen many random
acquisitions of the public anatomy transfers to unseen sites without spending any privacy budget: SynthSeg
(Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without retraining",
Medical Image Analysis 86, 2023) trains on images whose per-label intensities, blur, resolution, bias and noise
are all drawn at random. Here the images are real (phantom) acquisitions, so instead of SynthSeg's pure
label-to-image Gaussian mixture each tissue's intensities are *remapped*: a random new mean per tissue and a random
scale of the within-tissue variation (texture, noise, partial volume are kept). Blur, low resolution, bias field,
gamma and noise come from MONAI's own random transforms, listed in the bundle's ``train.json``
(``domain_randomization_transforms``, switched by ``domain_randomization``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.networks.layers import GaussianFilter
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """Remap each tissue's intensities with a random mean and scale, read from the label map; label untouched.

    For tissue ``k`` (label value ``k``, background included) with current mean ``m_k`` in the image, a voxel
    becomes ``a_k * (x - m_k) + b_k`` with ``b_k ~ U(mean_range)`` and ``a_k ~ U(scale_range)``, drawn
    independently per tissue. The per-voxel ``a`` and ``b - a m`` are mixed by Gaussian-smoothed tissue
    memberships (``boundary_sigma`` voxels), so tissue boundaries stay smooth as after a real point spread
    function rather than becoming label-sharp steps. Results are clipped at 0 (MR magnitudes are non-negative).
    ``num_classes`` fixes how many draws one call makes, so a seed reproduces whatever labels a patch contains.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        num_classes: int = 8,
        mean_range: Sequence[float] = (0.0, 1.0),
        scale_range: Sequence[float] = (0.5, 1.5),
        boundary_sigma: float = 1.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(mean_range) != 2 or mean_range[0] > mean_range[1]:
            raise ValueError(f"mean_range must be (low, high), got {mean_range}")
        if len(scale_range) != 2 or scale_range[0] > scale_range[1] or scale_range[0] < 0:
            raise ValueError(f"scale_range must be (low, high) with low >= 0, got {scale_range}")
        if boundary_sigma < 0:
            raise ValueError(f"boundary_sigma must be >= 0, got {boundary_sigma}")
        self.label_key = label_key
        self.num_classes = int(num_classes)
        self.mean_range = (float(mean_range[0]), float(mean_range[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.boundary_sigma = float(boundary_sigma)
        self.means = torch.zeros(self.num_classes, dtype=torch.float64)
        self.scales = torch.ones(self.num_classes, dtype=torch.float64)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.means = torch.as_tensor(self.R.uniform(*self.mean_range, size=self.num_classes), dtype=torch.float64)
        self.scales = torch.as_tensor(self.R.uniform(*self.scale_range, size=self.num_classes), dtype=torch.float64)

    def memberships(self, label: torch.Tensor) -> torch.Tensor:
        """Smoothed one-hot tissue memberships (K, *spatial), summing to 1 at every voxel."""
        lab = label[0].long() if label.dim() > 1 and label.shape[0] == 1 else label.long()
        if int(lab.min()) < 0 or int(lab.max()) >= self.num_classes:
            raise ValueError(
                f"label values must lie in 0..{self.num_classes - 1}, got {int(lab.min())}..{int(lab.max())}"
            )
        onehot = torch.nn.functional.one_hot(lab, self.num_classes).movedim(-1, 0).to(torch.float32)
        if self.boundary_sigma > 0:
            smooth = GaussianFilter(spatial_dims=lab.dim(), sigma=self.boundary_sigma)
            onehot = smooth(onehot[None])[0].clamp_min(0)
        return onehot / onehot.sum(0, keepdim=True).clamp_min(1e-6)

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        d = dict(data)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return d
        label = convert_to_tensor(d[self.label_key], track_meta=False)
        weights = None
        for key in self.key_iterator(d):
            img = d[key]
            x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
            if weights is None:
                weights = self.memberships(label)
            out = torch.empty_like(x)
            for c in range(x.shape[0]):
                out[c] = self._remap(x[c], label, weights)
            d[key] = convert_to_dst_type(out.clamp_min(0), dst=img)[0]
        return d

    def _remap(self, x: torch.Tensor, label: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k (a_k (x - m_k) + b_k)`` with ``m_k`` the tissue's current mean (0 where it is absent)."""
        lab = label[0].long() if label.dim() == x.dim() + 1 else label.long()
        flat = lab.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_classes).to(torch.float64)
        sums = torch.bincount(flat, weights=x.reshape(-1).to(torch.float64), minlength=self.num_classes)
        current = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        a = self.scales.to(torch.float32)
        b = (self.means - self.scales * current).to(torch.float32)
        shape = (-1,) + (1,) * x.dim()
        return x * (weights * a.view(shape)).sum(0) + (weights * b.view(shape)).sum(0)
