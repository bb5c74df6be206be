import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fetalseg.data.io import (
    DicomSeriesError,
    find_images,
    image_datalist,
    is_dicom_file,
    is_dicom_series,
    is_label_name,
    read_dicom_series,
    read_header,
    read_volume,
    stem_of,
    write_nifti,
)
from tests.conftest import sphere_case, write_dicom_series


def test_nifti_roundtrip_sets_qform_and_sform(tmp_path):
    aff = np.array([[0, -0.5, 0, 10], [0.6, 0, 0, -20], [0, 0, 0.7, 5], [0, 0, 0, 1]], float)
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    p = write_nifti(arr, aff, tmp_path / "a.nii.gz", dtype=np.uint8)
    img = nib.load(str(p))
    assert img.header["qform_code"] == 1 and img.header["sform_code"] == 1
    vol = read_volume(p)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (0.6, 0.5, 0.7), atol=1e-6)
    assert read_header(p)[0] == (4, 5, 6)
    assert not list(tmp_path.glob(".tmp-*"))


def test_nrrd_matches_nifti_in_ras(tmp_path):
    """An NRRD written by SimpleITK (LPS) reads back with the same RAS affine and voxel order as the NIfTI."""
    aff = np.diag([0.8, 0.9, 1.1, 1.0])
    aff[:3, 3] = [5, -7, 12]
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    nii = write_nifti(arr, aff, tmp_path / "a.nii.gz")
    img = sitk.ReadImage(str(nii))
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    a, b = read_volume(nii), read_volume(tmp_path / "a.nrrd")
    np.testing.assert_allclose(b.array, a.array)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    shape, affine = read_header(tmp_path / "a.nrrd")
    assert shape == (6, 7, 8)
    np.testing.assert_allclose(affine, a.affine, atol=1e-4)


def test_names_and_discovery(tmp_path):
    for name in ["b.nii.gz", "a.nrrd", "a_seg.nii.gz", "sub-001_rec-mial_dseg.nii.gz", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert stem_of("sub-001_T2w.nii.gz") == "sub-001_T2w"
    assert is_label_name("x_dseg.nii.gz") and not is_label_name("x_T2w.nii.gz")
    assert [p.rsplit("/", 1)[1] for p in find_images(tmp_path)] == ["a.nrrd", "b.nii.gz"]
    assert len(image_datalist(tmp_path)) == 2


# -- DICOM series folders: one reader for every part of the project ------------------------------------------------

DICOM_AFFINES = {
    "RAS": np.diag([2.0, 2.0, 2.0, 1.0]),
    "LPS-anisotropic": np.array([[-1.7, 0, 0, 30], [0, -2.3, 0, 20], [0, 0, 3.1, -10], [0, 0, 0, 1]]),
    "permuted-PIR": np.array([[0, 0, 2.5, 0], [-2.2, 0, 0, 0], [0, -1.9, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(DICOM_AFFINES))
def test_dicom_series_reads_voxels_on_the_grid_it_was_written_with(tmp_path, name):
    image, _, affine = sphere_case(shape=(12, 14, 10), affine=DICOM_AFFINES[name])
    folder = write_dicom_series(image * 10, affine, tmp_path / "series")
    assert is_dicom_series(folder) and is_dicom_file(next(folder.iterdir()))
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.array, (image * 10).astype(np.int16))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    same = read_volume(folder)  # the generic reader takes the same path
    np.testing.assert_array_equal(same.array, vol.array)
    np.testing.assert_allclose(same.affine, vol.affine)
    shape, header_affine = read_header(folder)
    assert shape == image.shape
    np.testing.assert_allclose(header_affine, affine, atol=1e-4)


def test_dicom_slices_are_ordered_by_position_not_file_name(tmp_path):
    image, _, affine = sphere_case(shape=(10, 10, 8))
    folder = write_dicom_series(image, affine, tmp_path / "series")
    files = sorted(folder.iterdir())
    for i, path in enumerate(files):  # reverse the names: slice 0 is now the last file
        path.rename(folder / f"tmp{i}")
    for i in range(len(files)):
        (folder / f"tmp{i}").rename(folder / f"IM{len(files) - i:04d}")
    vol = read_dicom_series(folder)
    np.testing.assert_array_equal(vol.array, image.astype(np.int16))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)


def test_dicom_reading_leaves_the_text_encoding_alone(tmp_path):
    before = locale.getpreferredencoding(False)
    image, _, affine = sphere_case(shape=(8, 8, 6))
    read_dicom_series(write_dicom_series(image, affine, tmp_path / "s"))
    assert locale.getpreferredencoding(False) == before  # GDCM resets LC_CTYPE; keep_locale restores it


def test_dicom_folders_that_are_not_one_series_are_refused(tmp_path):
    image, _, affine = sphere_case(shape=(8, 8, 6))
    two = tmp_path / "two"
    write_dicom_series(image, affine, two, series=1)
    write_dicom_series(image, affine, two, series=2)
    with pytest.raises(DicomSeriesError, match="holds 2 series"):
        read_dicom_series(two)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    assert not is_dicom_series(tmp_path / "text")
    assert not is_dicom_series(tmp_path / "missing")
    with pytest.raises(DicomSeriesError, match="no readable DICOM image series"):
        read_dicom_series(tmp_path / "text")
