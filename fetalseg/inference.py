"""Whole-volume segmentation with the bundle's pre-processing, sliding-window inferer and inversion.

The result is returned on the input's own voxel grid (same shape, affine, orientation, spacing) because a
radiologist's viewer, the metrics and the datastore all compare against the original file, not the model's grid.
Inputs are NIfTI/NRRD files (read by the bundle's ``LoadImaged``) or DICOM series folders (read by the core's
:func:`fetalseg.data.io.read_dicom_series`, the same reader validation and the MONAI Label app use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.networks.utils import to_norm_affine
from monai.transforms import Compose, Invertd, LoadImaged, MapTransform
from monai.utils import get_torch_dtype_from_string

from fetalseg.bundle import Bundle
from fetalseg.data.io import Volume, is_dicom_series, read_dicom_series


class DicomSeriesReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`fetalseg.data.io.read_dicom_series`: the bundle's ``LoadImaged`` builds
    the same MetaTensor (float32, RAS affine, no channel) from a DICOM folder as from a NIfTI file."""

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return len(names) == 1 and is_dicom_series(names[0])

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Volume:
        names = [data] if isinstance(data, (str, Path)) else list(data)
        if len(names) != 1:
            raise ValueError("DicomSeriesReader reads one series folder at a time")
        return read_dicom_series(names[0])

    def get_data(self, img: Volume) -> tuple[np.ndarray, dict]:
        array = np.asarray(img.array)
        meta = {
            "affine": img.affine.copy(),
            "original_affine": img.affine.copy(),
            "spatial_shape": np.asarray(array.shape[:3]),
            "space": "RAS",
            "original_channel_dim": float("nan"),  # MONAI's "no channel"
        }
        return array, meta


class _LoadImagedWithDicom(MapTransform):
    """The bundle's ``LoadImaged``, except that DICOM series folders are read by :class:`DicomSeriesReader`."""

    def __init__(self, load: LoadImaged) -> None:
        super().__init__(load.keys, allow_missing_keys=True)
        self.load = load
        self.dicom = DicomSeriesReader()

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        dicom = [k for k in self.key_iterator(d) if isinstance(d[k], (str, Path)) and is_dicom_series(d[k])]
        folders = {k: str(d.pop(k)) for k in dicom}
        d = dict(self.load(d)) if any(k in d for k in self.load.keys) else d
        for key, folder in folders.items():
            d[key] = self.load._loader(str(folder), reader=self.dicom)
        return d


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
        if isinstance(self.preprocessing, Compose):  # DICOM folders through the core reader (see module doc)
            self.preprocessing.transforms = tuple(
                _LoadImagedWithDicom(t) if isinstance(t, LoadImaged) else t for t in self.preprocessing.transforms
            )
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
        return self.segment_prepared(self.preprocess(image), with_probabilities=with_probabilities)

    def segment_prepared(self, data: dict[str, Any], *, with_probabilities: bool = False) -> Segmentation:
        """:meth:`segment` of an item :meth:`preprocess` returned (kept by a caller that segments it again);
        ``data`` is only read, so one pre-processed item can serve several calls, also concurrently."""
        logits = self.logits(data)
        pred = _argmax_labels(logits)
        probabilities = torch.softmax(logits, dim=1)[0].cpu().numpy() if with_probabilities else None
        label, affine = self.to_input_space(data, pred)
        return Segmentation(label=label, affine=affine, probabilities=probabilities)

    def to_input_space(self, data: dict[str, Any], pred: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Undo the pre-processing's orientation and resampling on a label map ``pred`` (1, X, Y, Z, model grid).

        Orientation + spacing (the bundle's pre-processing) make the inverse a nearest-neighbour lookup whose source
        index along each input axis depends on that axis alone (unless the input is oblique to the model grid): it
        is computed as three index arrays with MONAI's own arithmetic and gathered (see :func:`_nearest_inverse`).
        Anything else (another step in the trace, an oblique input, reflection padding) runs MONAI's ``Invertd``.
        """
        affine = np.asarray(data["image"].meta.get("original_affine", data["image"].affine), dtype=float)
        label = _nearest_inverse(data["image"], pred)
        if label is None:
            label = self._invert_with_monai(data, pred)
        return label, affine

    def _invert_with_monai(self, data: dict[str, Any], pred: torch.Tensor) -> np.ndarray:
        """The reference inversion: MONAI's ``Invertd`` over the image's transform trace (nearest neighbour)."""
        data = dict(data)
        data["pred"] = MetaTensor(pred)  # Invertd copies the image's transform trace onto a MetaTensor
        inverted = self._invert(data)["pred"]
        return np.asarray(inverted.detach().cpu().numpy()[0]).round().astype(np.uint8)


def _argmax_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class index per voxel, (1, X, Y, Z) uint8 on the CPU, for logits (1, C, X, Y, Z); ties go to the lower class.

    On the CPU a running maximum over the classes (contiguous passes over each class volume) replaces the argmax
    reduction across the class axis, which strides through memory: 0.09 s instead of 0.46 s (NumPy) or more (torch)
    on the ``feta`` variant's 8 × 160³ logits. Same result as ``argmax`` for finite logits, ties included (a class
    wins only when strictly greater). On a GPU the reduction stays on the device."""
    if logits.device.type != "cpu":
        return torch.argmax(logits, dim=1, keepdim=True)[0].to(torch.uint8).cpu()
    scores = logits[0].detach()
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8)
    best = scores[0].clone()
    for c in range(1, scores.shape[0]):
        labels.masked_fill_(scores[c] > best, c)
        torch.maximum(best, scores[c], out=best)
    return labels[None]


def _nearest_inverse(image: Any, pred: torch.Tensor) -> np.ndarray | None:
    """``pred`` (1, X, Y, Z on the model grid of pre-processed ``image``) on the input's grid by index arrays, or
    None when the shortcut does not apply (then MONAI's ``Invertd`` runs).

    MONAI inverts ``Spacingd`` with ``affine_grid`` + ``grid_sample(mode="nearest")`` over the whole input grid and
    ``Orientationd`` with a flip/permutation. When the voxel-to-voxel map has no off-diagonal terms (any input that
    is not oblique to the model grid), every term MONAI adds for the other axes is an exact zero, so the source
    coordinate along one axis depends on that axis alone: this function evaluates MONAI's own arithmetic (same
    normalisation, same float dtype, same operation order, same round-half-to-even) on one line per axis and
    gathers the result with three index arrays. Equality with ``Invertd`` is tested, ties included.
    """
    if not isinstance(image, MetaTensor) or pred.ndim != 4 or pred.shape[0] != 1:
        return None
    ops = list(image.applied_operations)
    names = [op.get("class") for op in ops]
    if names not in (["Orientation", "SpatialResample"], ["Orientation"], ["SpatialResample"], []):
        return None
    if any(op.get("lazy") for op in ops):
        return None
    meta = image.meta
    if "original_affine" not in meta or "spatial_shape" not in meta:
        return None
    model_shape = tuple(int(s) for s in pred.shape[1:])
    if tuple(image.shape[1:]) != model_shape:
        return None
    model_affine = torch.as_tensor(image.affine).detach().cpu().to(torch.float64)
    original = np.asarray(meta["original_affine"], dtype=np.float64)
    in_shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
    if len(in_shape) != 3 or model_affine.shape != (4, 4):
        return None

    # 1. Spacingd inverse: model grid -> oriented input grid (per-axis index arrays)
    if names and names[-1] == "SpatialResample":
        op = ops[-1]
        extra = op.get("extra_info", {})
        oriented_shape = tuple(int(s) for s in op["orig_size"])
        spacing_index = _resample_indices(model_affine, extra, model_shape, oriented_shape)
        if spacing_index is None:
            return None
        oriented_affine = np.asarray(torch.as_tensor(extra["src_affine"]).cpu().numpy(), dtype=np.float64)
    else:
        oriented_shape, oriented_affine = model_shape, model_affine.numpy()
        spacing_index = [np.arange(n) for n in model_shape]

    # 2. Orientationd inverse: a flip/permutation between the oriented grid and the input grid
    flip_perm = np.linalg.solve(oriented_affine, original)  # input voxel -> oriented voxel
    linear, shift = flip_perm[:3, :3], flip_perm[:3, 3]
    if not np.allclose(np.abs(linear), np.round(np.abs(linear)), atol=1e-6) or not np.allclose(
        shift, np.round(shift), atol=1e-6
    ):
        return None
    signed = np.round(linear).astype(int)
    if not ((np.abs(signed).sum(axis=0) == 1).all() and (np.abs(signed).sum(axis=1) == 1).all()):
        return None
    order, indices = [], []
    for j in range(3):  # input axis j is oriented axis a, possibly flipped
        a = int(np.flatnonzero(signed[:, j])[0])
        oriented = signed[a, j] * np.arange(in_shape[j]) + round(float(shift[a]))
        if oriented.min() < 0 or oriented.max() >= oriented_shape[a]:
            return None
        order.append(a)
        indices.append(spacing_index[a][oriented])
    source = pred[0].detach().cpu().numpy()
    out_of_grid = [idx < 0 for idx in indices]
    # Gathered on the reversed axes, so the result's transpose is Fortran-ordered: NIfTI and NRRD store voxels in
    # Fortran order, and writing a C-ordered 256³ label map spends ~0.1 s transposing it (more than compressing).
    reverse = source.transpose(order[::-1])
    for axis in (0, 1, 2):  # one axis at a time, the widest copy last (row copies): ~15 ms at 256³
        reverse = np.take(reverse, np.maximum(indices[axis], 0), axis=2 - axis)
    if any(o.any() for o in out_of_grid):  # "zeros" padding: outside the model grid is background
        mask = np.ix_(*out_of_grid[::-1])
        reverse = np.where(mask[0] | mask[1] | mask[2], 0, reverse)
    label = np.asarray(reverse).T  # input axis order, Fortran-contiguous
    return label.round().astype(np.uint8) if label.dtype.kind == "f" else label.astype(np.uint8, copy=False)


def _resample_indices(
    model_affine: torch.Tensor, extra: dict, model_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[np.ndarray] | None:
    """Source index (into the model grid; -1 = outside with zeros padding) of each output voxel along each axis,
    as MONAI's ``SpatialResample.inverse`` computes it with ``mode="nearest"``; None if not per-axis."""
    padding = str(extra.get("padding_mode", "border"))
    align = extra.get("align_corners")
    align = bool(align) if isinstance(align, bool) else False
    try:
        dtype = get_torch_dtype_from_string(str(extra.get("dtype", "float64")))
    except Exception:
        return None
    if padding not in ("border", "zeros") or dtype not in (torch.float32, torch.float64) or len(out_shape) != 3:
        return None
    src = model_affine.numpy()
    dst = np.asarray(torch.as_tensor(extra["src_affine"]).cpu().numpy(), dtype=np.float64)
    xform = np.linalg.solve(src, dst)  # as monai.transforms.spatial.functional.spatial_resample
    same_size = tuple(model_shape) == tuple(out_shape)
    if same_size and (np.allclose(src, dst, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)):
        return [np.arange(n) for n in out_shape]  # MONAI copies without resampling
    theta = to_norm_affine(
        torch.as_tensor(xform, dtype=torch.float64).to(dtype)[None],
        src_size=model_shape,
        dst_size=out_shape,
        align_corners=align,
        zero_centered=False,
    )[0]
    if bool((theta[:3, :3] - torch.diag(torch.diagonal(theta[:3, :3])) != 0).any()):
        return None  # oblique to the model grid: the other axes' terms are not exact zeros
    indices = []
    for axis in range(3):
        n_out, n_src = out_shape[axis], model_shape[axis]
        base = torch.linspace(-1, 1, n_out, dtype=dtype)  # torch's affine_grid base grid
        if not align:
            base = base * (n_out - 1) / n_out
        grid = base * theta[axis, axis] + theta[axis, 3]  # the grid's bmm: exact zeros for the other axes
        coord = (grid + 1) / 2 * (n_src - 1) if align else ((grid + 1) * n_src - 1) / 2  # grid_sample's unnormalise
        if padding == "border":
            coord = torch.clamp(coord, 0, n_src - 1)
        index = torch.round(coord).to(torch.int64).numpy()  # nearbyint: round half to even
        index[(index < 0) | (index >= n_src)] = -1
        indices.append(index)
    return indices
