"""Every bad input gets a clear error naming the file and the problem."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from fetalseg.data.io import write_nifti
from fetalseg.data.validation import (
    DataValidationError,
    check_label_values,
    load_checked_volume,
    validate_pair,
)
from tests.conftest import sphere_case, write_dicom_series


def test_valid_pair_has_no_problems(write_case):
    img, lab = write_case()
    assert validate_pair(img, lab) == []


def test_missing_file(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        load_checked_volume(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    with pytest.raises(DataValidationError, match="empty"):
        load_checked_volume(p)


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(DataValidationError, match="not a NIfTI/NRRD"):
        load_checked_volume(p)


def test_garbage_with_image_suffix(tmp_path):
    p = tmp_path / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(DataValidationError, match="cannot be read"):
        load_checked_volume(p)


def test_truncated_gzip(write_case, tmp_path):
    img, _ = write_case()
    data = img.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match="cannot be read"):
        load_checked_volume(bad)


def test_2d_volume_rejected(tmp_path):
    p = write_nifti(np.zeros((32, 32), np.float32), np.eye(4), tmp_path / "slice.nii.gz")
    with pytest.raises(DataValidationError, match="expected a 3D volume, got 2D"):
        load_checked_volume(p)


def test_single_slice_3d_is_called_2d(tmp_path):
    p = write_nifti(np.zeros((32, 32, 1), np.float32), np.eye(4), tmp_path / "slice.nii.gz")
    with pytest.raises(DataValidationError, match="2D slice"):
        load_checked_volume(p)


def test_4d_volume_rejected_but_trailing_singleton_accepted(tmp_path):
    p = write_nifti(np.zeros((8, 8, 8, 3), np.float32), np.eye(4), tmp_path / "fmri.nii.gz")
    with pytest.raises(DataValidationError, match="got 4D"):
        load_checked_volume(p)
    q = write_nifti(np.ones((8, 8, 8, 1), np.float32), np.eye(4), tmp_path / "single.nii.gz")
    assert load_checked_volume(q).array.shape == (8, 8, 8)


def test_nan_intensities_rejected(tmp_path):
    arr = np.ones((8, 8, 8), np.float32)
    arr[1, 1, 1] = np.nan
    p = write_nifti(arr, np.eye(4), tmp_path / "nan.nii.gz")
    with pytest.raises(DataValidationError, match="NaN"):
        load_checked_volume(p)


def test_label_values_outside_range(write_case, tmp_path):
    img, lab = write_case()
    arr = np.asarray(nib.load(str(lab)).dataobj).copy()
    arr[0, 0, 0] = 9
    bad = write_nifti(arr, nib.load(str(lab)).affine, tmp_path / "bad_seg.nii.gz", dtype=np.uint8)
    problems = validate_pair(img, bad)
    assert len(problems) == 1 and "outside 0..7: 9" in problems[0] and "bad_seg.nii.gz" in problems[0]


def test_negative_and_fractional_labels():
    assert "outside 0..7: -1" in check_label_values(np.array([0, -1, 3], np.int16))[0]
    assert "whole numbers" in check_label_values(np.array([0.0, 1.5], np.float32))[0]
    assert check_label_values(np.array([0.0, 1.0, 7.0], np.float32)) == []


def test_label_shape_mismatch(write_case, tmp_path):
    img, _ = write_case()
    lab = write_nifti(np.zeros((10, 10, 10), np.uint8), np.diag([2, 2, 2, 1]), tmp_path / "x_seg.nii.gz")
    problems = validate_pair(img, lab)
    assert "does not match its image" in problems[0]


def test_label_affine_mismatch(write_case, tmp_path):
    img, lab = write_case()
    vol = nib.load(str(lab))
    shifted = vol.affine.copy()
    shifted[0, 3] += 5.0
    bad = write_nifti(np.asarray(vol.dataobj), shifted, tmp_path / "shift_seg.nii.gz", dtype=np.uint8)
    assert "affine" in validate_pair(img, bad)[0]


def test_missing_label(write_case):
    img, _ = write_case()
    assert "has no label" in validate_pair(img, None)[0]


def test_error_lists_every_problem():
    err = DataValidationError(["a is bad", "b is bad"], context="site-1")
    assert "2 problems" in str(err) and "a is bad" in str(err) and "b is bad" in str(err)
    assert err.problems == ["a is bad", "b is bad"]


def test_dicom_series_folder_is_checked_like_a_file(tmp_path):
    """Validation reads a DICOM series folder through the core reader and applies the same rules."""
    image, label, affine = sphere_case(shape=(12, 14, 10))
    folder = write_dicom_series(image * 10, affine, tmp_path / "series")
    vol = load_checked_volume(folder)
    np.testing.assert_array_equal(vol.array, (image * 10).astype(np.int16))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    lab = write_nifti(label, affine, tmp_path / "label.nii.gz", dtype=np.uint8)
    assert validate_pair(folder, lab) == []
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    off = write_nifti(label, shifted, tmp_path / "off.nii.gz", dtype=np.uint8)
    assert any("affine" in p for p in validate_pair(folder, off))
    thin = write_dicom_series(image[:, :, :2], affine, tmp_path / "thin")
    with pytest.raises(DataValidationError, match="2D slice"):
        load_checked_volume(thin)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(DataValidationError, match="folder is not a DICOM series"):
        load_checked_volume(tmp_path / "notes")
