import nibabel as nib
import numpy as np
import SimpleITK as sitk

from fetalseg.data.io import find_images, image_datalist, is_label_name, read_header, read_volume, stem_of, write_nifti


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
