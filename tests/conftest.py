"""Shared test fixtures: tiny synthetic volumes and a tiny multi-site federation (32³, generated once)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TINY = "tiny"  # bundle variant for 32³ test volumes


def sphere_case(shape=(24, 26, 22), *, seed: int = 0, affine: np.ndarray | None = None):
    """Concentric label shells 7..1 (values 0..7) and a noisy image: the smallest valid case."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.normal(0, 0.5, 3)
    r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    for value, radius in enumerate([10, 8.5, 7, 5.5, 4, 3, 2], start=1):
        label[r < radius] = value
    image = (label * 10.0 + rng.normal(0, 2, shape) + 5).astype(np.float32)
    if affine is None:
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return image, label, affine


def write_dicom_series(array: np.ndarray, affine: np.ndarray, folder: Path, *, series: int = 1) -> Path:
    """Write ``array`` (x, y, z) with RAS ``affine`` as an axial MR DICOM series, one file per z slice
    (``series`` numbers the series UID and file names, to put two series in one folder)."""
    import SimpleITK as sitk

    from fetalseg.data.io import keep_locale

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    row, col = direction[:, 0], direction[:, 1]
    with keep_locale():  # GDCM's writer resets the process locale (see keep_locale)
        _write_slices(image, writer, row, col, folder, array.shape[2], series)
    return folder


def _write_slices(image, writer, row, col, folder: Path, depth: int, series: int) -> None:
    for k in range(depth):
        slc = image[:, :, k]
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.8.498.1"),
            ("0020|000e", f"1.2.826.0.1.3680043.8.498.1.{series}"),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in (*row, *col))),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
            ("0020|0013", str(k + 1)),
            ("0008|0018", f"1.2.826.0.1.3680043.8.498.1.{series}.{k + 1}"),
        ):
            slc.SetMetaData(tag, value)
        writer.SetFileName(str(folder / (f"slice{k:03d}.dcm" if series == 1 else f"s{series}-slice{k:03d}.dcm")))
        writer.Execute(slc)


@pytest.fixture
def write_case(tmp_path: Path):
    """Write an image (+ label) pair; returns their paths."""
    from fetalseg.data.io import write_nifti

    def _write(name: str = "case", *, folder: Path | None = None, seed: int = 0, **kw):
        folder = folder or tmp_path
        image, label, affine = sphere_case(seed=seed, **kw)
        img = write_nifti(image, affine, folder / f"{name}.nii.gz")
        lab = write_nifti(label, affine, folder / f"{name}_seg.nii.gz", dtype=np.uint8)
        return img, lab

    return _write


@pytest.fixture
def site_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A site's client process without NVFlare: its state folder in ``tmp_path/state``, no site data, data root or
    ledger variables leaking in from the environment, one torch thread (tests share 2 cores). Returns ``tmp_path``."""
    import torch

    from fetalseg.site_env import ENV_SITE_STATE, SITE_VARIABLES

    for var in SITE_VARIABLES:  # new names and their deprecated aliases
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ENV_SITE_STATE, str(tmp_path / "state"))
    torch.set_num_threads(1)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> list[Path]:
    """3 synthetic sites × 4 cases of 32³ phantoms in FeTA BIDS layout (read-only: do not modify)."""
    from fetalseg.data.federation import write_federation

    out = tmp_path_factory.mktemp("federation")
    return write_federation(out, n_sites=3, cases_per_site=4, shape=(32, 32, 32), seed=0)
