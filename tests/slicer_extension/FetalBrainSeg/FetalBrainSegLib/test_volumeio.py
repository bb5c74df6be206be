"""The stdlib NIfTI/NRRD codec agrees with nibabel, pynrrd and SimpleITK, and refuses damaged files clearly."""

from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from FetalBrainSegLib.errors import FileFormatError
from FetalBrainSegLib.volumeio import (
    LPS_TO_RAS,
    nifti_bytes,
    nrrd_bytes,
    read_geometry,
    read_volume,
    suffix_of,
    write_nifti,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def _affine(angles_deg=(10.0, -20.0, 30.0), spacing=(0.5, 0.7, 1.1), origin=(3.0, -4.0, 5.0), flip=1) -> np.ndarray:
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx @ np.diag([spacing[0], spacing[1], spacing[2] * flip])
    out[:3, 3] = origin
    return out


@pytest.mark.parametrize("flip", [1, -1])
def test_nifti_written_here_reads_in_nibabel_with_same_sform_and_qform(tmp_path, phantom, flip):
    affine = _affine(flip=flip)
    path = write_nifti(tmp_path / "label.nii.gz", phantom.label, affine)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), phantom.label)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)  # ITK-based readers use the qform
    assert img.get_data_dtype() == np.uint8


def test_nifti_written_by_nibabel_reads_here(tmp_path, phantom):
    img = nib.Nifti1Image(phantom.image, phantom.affine)
    nib.save(img, str(tmp_path / "image.nii.gz"))
    vol = read_volume(tmp_path / "image.nii.gz")
    np.testing.assert_array_equal(vol.array, phantom.image)
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-5)
    geo = read_geometry(tmp_path / "image.nii.gz")
    assert geo.shape == phantom.image.shape
    np.testing.assert_allclose(geo.spacing, np.linalg.norm(phantom.affine[:3, :3], axis=0), atol=1e-5)


def test_nifti_qform_only_and_scaled_data(tmp_path):
    affine = _affine(flip=-1)
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(None, code=0)
    img.set_qform(affine, code=1)
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, str(tmp_path / "q.nii"))
    vol = read_volume(tmp_path / "q.nii")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.array, data * 2.0 + 1.0)


def test_nrrd_agrees_with_pynrrd_and_simpleitk(tmp_path, phantom):
    path = tmp_path / "label.nrrd"
    path.write_bytes(nrrd_bytes(phantom.label, phantom.affine))
    data, header = nrrd.read(str(path))
    np.testing.assert_array_equal(data, phantom.label)
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"].T, (LPS_TO_RAS @ phantom.affine)[:3, :3])
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(itk.GetOrigin(), (LPS_TO_RAS @ phantom.affine)[:3, 3])
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, phantom.label)
    np.testing.assert_array_equal(vol.affine, phantom.affine)  # repr() floats: exact round trip


@pytest.mark.parametrize("encoding", ["raw", "gzip", "bzip2", "ascii"])
def test_nrrd_encodings_written_by_pynrrd(tmp_path, encoding):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    affine = _affine()
    header = {
        "space": "right-anterior-superior",
        "space directions": affine[:3, :3].T,
        "space origin": affine[:3, 3],
        "encoding": encoding,
    }
    nrrd.write(str(tmp_path / "x.nrrd"), data, header)
    vol = read_volume(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-9)


def test_simpleitk_files_agree_between_formats(tmp_path, phantom):
    itk = sitk.GetImageFromArray(phantom.label.transpose(2, 1, 0))
    itk.SetSpacing((0.8, 0.9, 1.3))
    itk.SetOrigin((10.0, -20.0, 30.0))
    itk.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    sitk.WriteImage(itk, str(tmp_path / "a.nrrd"), True)
    sitk.WriteImage(itk, str(tmp_path / "a.nii.gz"))
    a, b = read_volume(tmp_path / "a.nrrd"), read_volume(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(a.array, phantom.label)
    np.testing.assert_array_equal(b.array, phantom.label)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


@settings(max_examples=25, deadline=None, database=None)  # no .hypothesis folder in the repo
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.1, 5.0)] * 3),
    flip=st.sampled_from([1, -1]),
)
def test_nifti_affine_round_trip_any_orientation(angles, spacing, flip):
    affine = _affine(angles, spacing, (1.5, -2.5, 7.0), flip)
    data = nifti_bytes(np.zeros((2, 2, 2), np.uint8), affine, compress=False)
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(data))
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-4)
    np.testing.assert_allclose(hdr.get_sform(), affine, atol=1e-4)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "too short"),
        (b"hello world" * 40, "neither a NIfTI-1 nor a NRRD"),
        (b"NRRD0004\ntype: uchar\n", "no end"),
        (
            b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\nspace: scanner-xyz\n\n" + bytes(8),
            "space",
        ),
        (b"NRRD0004\ntype: quaternion\ndimension: 3\nsizes: 2 2 2\n\n" + bytes(8), "type"),
        (b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: gzip\n\nnot gzip", "damaged"),
        (b"NRRD0004\ntype: uchar\ndimension: 2\nsizes: 2 2\nencoding: raw\nspacings: 1 1\n\n" + bytes(4), "2D"),
    ],
)
def test_damaged_or_unsupported_files_raise_clear_errors(tmp_path, content, expected):
    path = tmp_path / "bad.nii"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=expected):
        read_volume(path)


def test_truncated_nifti_is_reported_as_truncated(tmp_path, phantom):
    full = nifti_bytes(phantom.label, phantom.affine, compress=False)
    (tmp_path / "cut.nii").write_bytes(full[: len(full) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        read_volume(tmp_path / "cut.nii")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(full)[:200])
    with pytest.raises(FileFormatError, match="damaged or truncated"):
        read_volume(tmp_path / "cut.nii.gz")


def test_suffixes():
    assert suffix_of("a/b/x.seg.nrrd") == ".seg.nrrd"
    assert suffix_of("X.NII.GZ") == ".nii.gz"
    assert suffix_of("x.mha") == ""
