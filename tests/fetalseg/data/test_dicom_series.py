"""Synthetic volumes -> DICOM MR series -> read back: same voxels (within the rescale step) on the same grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from fetalseg.data.dicom_series import rescale_step, volume_to_datasets, write_dicom_series
from fetalseg.data.io import read_dicom_series
from fetalseg.data.phantom import generate_phantom, site_profiles

OBLIQUE = np.array(
    [
        [-1.7 * np.cos(0.3), 0, 2.5 * np.sin(0.3), 30],
        [0, -2.3, 0, 20],
        [1.7 * np.sin(0.3), 0, 2.5 * np.cos(0.3), -10],
        [0, 0, 0, 1],
    ]
)  # rotated about y, anisotropic, LPS-like
PERMUTED = np.array([[0, 0, 2.5, 0], [-2.2, 0, 0, 0], [0, -1.9, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [None, OBLIQUE, PERMUTED], ids=["phantom", "oblique", "permuted"])
def test_round_trip_keeps_voxels_and_grid(tmp_path, affine):
    profile = site_profiles(1)[0]
    case = generate_phantom(shape=(20, 22, 18), ga_weeks=28.0, profile=profile, seed=3)
    affine = case.affine if affine is None else affine
    write_dicom_series(case.image, affine, tmp_path / "series", patient_id="P001")
    back = read_dicom_series(tmp_path / "series")
    assert back.array.shape == case.image.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    step = rescale_step(case.image)
    assert np.abs(back.array.astype(np.float64) - case.image).max() <= step / 2 + 1e-6 * np.abs(case.image).max()


def test_headers_name_one_series_with_geometry():
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    datasets = volume_to_datasets(image, np.diag([1.5, 2.0, 3.0, 1.0]), patient_id="P9", series_uid="1.2.3.4")
    assert len(datasets) == 3
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    first = datasets[1]
    assert (first.Rows, first.Columns) == (5, 4)
    assert [float(v) for v in first.PixelSpacing] == [2.0, 1.5]
    assert float(first.SliceThickness) == 3.0
    assert [float(v) for v in first.ImagePositionPatient] == [-0.0, -0.0, 3.0]
    assert [float(v) for v in first.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    pixels = first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_allclose(pixels, image[:, :, 1].T, atol=rescale_step(image))
    assert pydicom.dataset.Dataset.from_json(first.to_json_dict()).Modality == "MR"


def test_sheared_grid_and_bad_values_are_refused():
    sheared = np.array([[1.0, 0, 0.5, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="sheared"):
        volume_to_datasets(np.zeros((3, 3, 3)), sheared, patient_id="P")
    with pytest.raises(ValueError, match="NaN"):
        volume_to_datasets(np.full((3, 3, 3), np.nan), np.eye(4), patient_id="P")
    with pytest.raises(ValueError, match="3D"):
        volume_to_datasets(np.zeros((3, 3)), np.eye(4), patient_id="P")
