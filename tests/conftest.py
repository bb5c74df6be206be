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


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> list[Path]:
    """3 synthetic sites × 4 cases of 32³ phantoms in FeTA BIDS layout (read-only: do not modify)."""
    from fetalseg.data.federation import write_federation

    out = tmp_path_factory.mktemp("federation")
    return write_federation(out, n_sites=3, cases_per_site=4, shape=(32, 32, 32), seed=0)
