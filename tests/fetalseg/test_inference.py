"""Segmentations come back on the input's own grid, whatever its orientation, spacing or format."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fetalseg.bundle import Bundle
from fetalseg.data.io import read_volume, write_nifti
from fetalseg.inference import Segmenter
from tests.conftest import sphere_case

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
