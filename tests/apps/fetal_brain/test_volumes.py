"""Reading what users send: DICOM series on the right grid, Slicer segmentations in FeTA values, clear refusals."""

import locale

import numpy as np
import pytest
import slicerio
from monai.transforms import LoadImage

from apps.fetal_brain.lib.errors import UnprocessableError
from apps.fetal_brain.lib.volumes import (
    check_image_header,
    is_dicom_dir,
    load_image,
    load_label_for,
    read_dicom_series,
    read_seg_nrrd,
)
from fetalseg.data.io import read_dicom_series as core_read_dicom_series
from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import AFFINES, write_dicom_series
from tests.conftest import sphere_case

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_dicom_series_reads_on_the_grid_it_was_written_with(tmp_path, name):
    image, _, affine = sphere_case(shape=(12, 14, 10), affine=AFFINES[name])
    folder = write_dicom_series(image * 10, affine, tmp_path / "series")
    assert is_dicom_dir(folder)
    vol = read_dicom_series(folder)
    assert vol.array.shape == image.shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, (image * 10).astype(np.int16))
    monai = LoadImage(image_only=True)(str(folder))  # the bundle's loader agrees on the geometry
    np.testing.assert_allclose(np.asarray(monai.affine), affine, atol=1e-4)


def test_dicom_io_leaves_the_text_encoding_alone(tmp_path):
    before = locale.getpreferredencoding(False)
    image, _, affine = sphere_case(shape=(8, 8, 6))
    read_dicom_series(write_dicom_series(image, affine, tmp_path / "s"))
    assert locale.getpreferredencoding(False) == before  # GDCM resets LC_CTYPE; the app and helper restore it


def test_folder_that_is_not_dicom_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("hello")
    assert not is_dicom_dir(tmp_path / "x")
    with pytest.raises(UnprocessableError, match="not a DICOM series"):
        load_image(tmp_path / "x")


def _segmentation(shape, affine, segments):
    seg = slicerio.create_segmentation(shape, LPS @ affine)
    for name, mask in segments:
        slicerio.add_segment(seg, mask, {"id": name.replace(" ", "_"), "name": name})
    return seg


def test_seg_nrrd_segments_are_matched_by_name(tmp_path):
    shape, affine = (10, 11, 12), AFFINES["RAS"]
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[1:4, 1:4, 1:4] = True
    b[6:9, 6:9, 6:9] = True
    path = tmp_path / "s.seg.nrrd"
    slicerio.write_segmentation(str(path), _segmentation(shape, affine, [("Brainstem", a), ("ventricles", b)]))
    vol = read_seg_nrrd(path)
    assert vol.array[a].tolist() == [7] * int(a.sum())
    assert vol.array[b].tolist() == [4] * int(b.sum())
    np.testing.assert_allclose(vol.affine, affine)


def test_seg_nrrd_with_unknown_segment_outside_range_is_refused(tmp_path):
    shape = (9, 4, 4)
    masks = [np.zeros(shape, bool) for _ in range(9)]
    for i, m in enumerate(masks):
        m[i, 0, 0] = True  # 9 disjoint segments: Slicer numbers them 1..9 in one layer
    path = tmp_path / "s.seg.nrrd"
    slicerio.write_segmentation(
        str(path), _segmentation(shape, AFFINES["RAS"], [(f"thing {i}", m) for i, m in enumerate(masks)])
    )
    with pytest.raises(UnprocessableError, match=r"thing 7.*value 8.*not one of the FeTA tissues"):
        read_seg_nrrd(path)


def test_overlapping_segments_are_refused(tmp_path):
    shape = (6, 6, 6)
    a = np.zeros(shape, bool)
    a[1:4, 1:4, 1:4] = True
    path = tmp_path / "o.seg.nrrd"
    slicerio.write_segmentation(
        str(path), _segmentation(shape, AFFINES["RAS"], [("Grey matter", a), ("White matter", a)])
    )
    with pytest.raises(UnprocessableError, match="overlap"):
        read_seg_nrrd(path)


def test_cropped_slicer_segmentation_is_placed_back_on_the_image_grid(tmp_path):
    image, label, affine = sphere_case(shape=(20, 20, 20))
    image_path = write_nifti(image, affine, tmp_path / "img.nii.gz")
    crop = (slice(4, 12), slice(5, 15), slice(6, 10))
    mask = label[crop] == 3
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] += affine[:3, :3] @ np.array([4, 5, 6])
    path = tmp_path / "c.seg.nrrd"
    slicerio.write_segmentation(str(path), _segmentation(mask.shape, cropped_affine, [("White matter", mask)]))
    out = load_label_for(image_path, path)
    expected = np.zeros(image.shape, np.uint8)
    expected[crop][mask] = 3
    np.testing.assert_array_equal(out, expected)


def test_label_checks_name_the_problem(tmp_path):
    image, label, affine = sphere_case(shape=(16, 16, 16))
    image_path = write_nifti(image, affine, tmp_path / "img.nii.gz")
    ok = write_nifti(label, affine, tmp_path / "ok.nii.gz", dtype=np.uint8)
    np.testing.assert_array_equal(load_label_for(image_path, ok), label)
    shifted = affine.copy()
    shifted[2, 3] += 1.0
    off_grid = write_nifti(label, shifted, tmp_path / "off.nii.gz", dtype=np.uint8)
    with pytest.raises(UnprocessableError, match="affine"):
        load_label_for(image_path, off_grid)
    bad_values = write_nifti(label.astype(np.int16) + 8, affine, tmp_path / "val.nii.gz", dtype=np.int16)
    with pytest.raises(UnprocessableError, match=r"outside 0\.\.7"):
        load_label_for(image_path, bad_values)


def test_header_check_refuses_2d_without_reading_voxels(tmp_path):
    path = write_nifti(np.zeros((30, 30, 2), np.float32), np.eye(4), tmp_path / "slice.nii.gz")
    with pytest.raises(UnprocessableError, match="2D"):
        check_image_header(path)
    check_image_header(write_nifti(np.zeros((8, 8, 8), np.float32), np.eye(4), tmp_path / "vol.nii.gz"))


def test_dicom_folder_problems_are_the_core_readers_as_422(tmp_path):
    """The app reads DICOM through fetalseg.data.io; the core's reasons reach the client as UnprocessableError."""
    image, _, affine = sphere_case(shape=(8, 8, 6))
    folder = tmp_path / "two"
    write_dicom_series(image, affine, folder, series=1)
    write_dicom_series(image, affine, folder, series=2)
    assert is_dicom_dir(folder)
    with pytest.raises(UnprocessableError, match="holds 2 series"):
        read_dicom_series(folder)
    with pytest.raises(UnprocessableError, match="holds 2 series"):
        load_image(folder)
    one = write_dicom_series(image * 3, affine, tmp_path / "one")
    np.testing.assert_array_equal(load_image(one).array, core_read_dicom_series(one).array)
