"""Segmentations come back on the input's own grid, whatever its orientation, spacing or format."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fetalseg.bundle import Bundle
from fetalseg.data.io import read_dicom_series, read_volume, write_nifti
from fetalseg.inference import Segmenter, _nearest_inverse
from tests.conftest import sphere_case, write_dicom_series

AFFINES = {
    "RAS": np.diag([2.0, 2.0, 2.0, 1.0]),
    "LPS-anisotropic": np.array([[-1.7, 0, 0, 30], [0, -2.3, 0, 20], [0, 0, 3.1, -10], [0, 0, 0, 1]]),
    "permuted-PIR": np.array([[0, 0, 2.5, 0], [-2.2, 0, 0, 0], [0, -1.9, 0, 0], [0, 0, 0, 1]]),
}


@pytest.fixture(scope="module")
def segmenter():
    bundle = Bundle("common", variant="tiny")
    return Segmenter(bundle.network(), bundle=bundle)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_output_in_input_space(segmenter, tmp_path, name):
    image, _, affine = sphere_case(shape=(21, 26, 17), affine=AFFINES[name])
    path = write_nifti(image, affine, tmp_path / "img.nii.gz")
    seg = segmenter.segment(path)
    assert seg.label.shape == image.shape
    assert seg.label.dtype == np.uint8
    np.testing.assert_allclose(seg.affine, nib.load(str(path)).affine, atol=1e-5)
    assert set(np.unique(seg.label).tolist()) <= set(range(8))


def test_nrrd_input(segmenter, tmp_path):
    image, _, affine = sphere_case(affine=AFFINES["LPS-anisotropic"])
    nii = write_nifti(image, affine, tmp_path / "img.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(tmp_path / "img.nrrd"))
    seg = segmenter.segment(tmp_path / "img.nrrd")
    assert seg.label.shape == read_volume(tmp_path / "img.nrrd").array.shape
    np.testing.assert_allclose(seg.affine, read_volume(nii).affine, atol=1e-4)


def test_labels_survive_inversion(tmp_path):
    """The truth resampled to the model grid and inverted comes back as the truth on the input grid."""
    bundle = Bundle("common", variant="tiny")
    image, label, affine = sphere_case(shape=(30, 28, 26), affine=AFFINES["LPS-anisotropic"])
    path = write_nifti(image, affine, tmp_path / "img.nii.gz")
    lab_path = write_nifti(label, affine, tmp_path / "img_seg.nii.gz", dtype=np.uint8)
    segmenter = Segmenter(bundle.network(), bundle=bundle)
    data = segmenter.preprocess({"image": str(path), "label": str(lab_path)})
    assert tuple(data["image"].shape[1:]) != label.shape  # really resampled and reoriented
    back, back_affine = segmenter.to_input_space(data, data["label"].as_tensor().to(torch.uint8))
    assert back.shape == label.shape
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    # 4 mm model grid vs ~2 mm input: only boundary voxels may change, and labels must not be shifted or flipped
    assert (back == label).mean() > 0.85
    for value in range(1, 8):
        assert np.abs(np.argwhere(back == value).mean(0) - np.argwhere(label == value).mean(0)).max() < 1.5


def test_probabilities_on_request(segmenter, tmp_path):
    image, _, affine = sphere_case()
    path = write_nifti(image, affine, tmp_path / "img.nii.gz")
    seg = segmenter.segment(path, with_probabilities=True)
    assert seg.probabilities.shape[0] == 8
    np.testing.assert_allclose(seg.probabilities.sum(0), 1.0, atol=1e-4)


# -- inversion by index arrays: identical to MONAI's Invertd --------------------------------------------------------

INVERT_GEOMETRIES = {
    **AFFINES,
    # model grid 4 mm (tiny) from 1 mm / 2 mm voxels with the origin on the model grid: many half-voxel ties
    "ties-1mm": np.diag([1.0, 1.0, 1.0, 1.0]),
    "ties-flipped-0.5mm": np.array([[0, -0.5, 0, 3.0], [0, 0, 2.0, -1.0], [-1.0, 0, 0, 0.25], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(INVERT_GEOMETRIES))
@pytest.mark.parametrize("variant", ["tiny", None])
def test_index_inversion_equals_monai_invertd(tmp_path, name, variant):
    bundle = Bundle("common", variant=variant)
    segmenter = Segmenter(bundle.network(), bundle=bundle)
    image, _, affine = sphere_case(shape=(21, 26, 17), affine=INVERT_GEOMETRIES[name])
    data = segmenter.preprocess(write_nifti(image, affine, tmp_path / "img.nii.gz"))
    pred = torch.randint(
        0, 8, (1, *data["image"].shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    fast = _nearest_inverse(data["image"], pred)
    assert fast is not None  # the shortcut applies to axis-aligned inputs
    reference = segmenter._invert_with_monai(data, pred)
    assert fast.shape == reference.shape == image.shape
    np.testing.assert_array_equal(fast, reference)
    assert fast.flags.f_contiguous  # NIfTI's voxel order: written without a transposing copy
    label, out_affine = segmenter.to_input_space(data, pred)
    np.testing.assert_array_equal(label, reference)
    np.testing.assert_allclose(out_affine, affine, atol=1e-5)


def test_oblique_input_is_inverted_by_monai(segmenter, tmp_path):
    """An input rotated against the model grid leaves the shortcut; the answer is still MONAI's."""
    t = 0.3
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag(
        [1.1, 2.9, 1.3]
    )
    image, _, _ = sphere_case(shape=(20, 12, 18))
    data = segmenter.preprocess(write_nifti(image, affine, tmp_path / "oblique.nii.gz"))
    pred = torch.randint(
        0, 8, (1, *data["image"].shape[1:]), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    assert _nearest_inverse(data["image"], pred) is None
    label, _ = segmenter.to_input_space(data, pred)
    np.testing.assert_array_equal(label, segmenter._invert_with_monai(data, pred))


# -- DICOM series: read by the core reader, segmented like the same volume in NIfTI ----------------------------------


@pytest.mark.parametrize("name", ["LPS-anisotropic", "permuted-PIR"])
def test_dicom_series_segments_like_the_same_nifti(segmenter, tmp_path, name):
    """The Segmenter reads DICOM folders with the core reader (the voxels and float64 grid it returns), and the
    result matches the same volume saved as NIfTI. (NIfTI keeps its affine in float32: a 1e-6 mm difference may
    move half-voxel ties of the resampling, so labels are compared by agreement, inputs and grids exactly.)"""
    image, _, affine = sphere_case(shape=(21, 26, 17), affine=AFFINES[name])
    values = np.round(image * 10).astype(np.int16)
    folder = write_dicom_series(values, affine, tmp_path / "series")
    nifti = write_nifti(values, affine, tmp_path / "img.nii.gz")
    pre_dicom, pre_nifti = segmenter.preprocess(folder)["image"], segmenter.preprocess(nifti)["image"]
    np.testing.assert_array_equal(np.asarray(pre_dicom.meta["original_affine"]), read_dicom_series(folder).affine)
    assert pre_dicom.shape == pre_nifti.shape
    np.testing.assert_allclose(pre_dicom.numpy(), pre_nifti.numpy(), atol=1e-5)
    np.testing.assert_allclose(pre_dicom.affine.numpy(), pre_nifti.affine.numpy(), atol=1e-5)
    from_dicom, from_nifti = segmenter.segment(folder), segmenter.segment(nifti)
    assert from_dicom.label.shape == values.shape
    np.testing.assert_allclose(from_dicom.affine, affine, atol=1e-4)
    assert (from_dicom.label == from_nifti.label).mean() > 0.9


def test_argmax_labels_equals_argmax_with_ties():
    from fetalseg.inference import _argmax_labels

    logits = torch.randn(1, 8, 9, 7, 5, generator=torch.Generator().manual_seed(0))
    logits[0, 5, :3] = logits[0, 2, :3] = logits[0].amax(0)[:3] + 1  # a tie for the maximum: the lower class wins
    labels = _argmax_labels(logits)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 9, 7, 5)
    torch.testing.assert_close(labels, torch.argmax(logits, dim=1).to(torch.uint8))
    assert (labels[0, :3] == 2).all()
