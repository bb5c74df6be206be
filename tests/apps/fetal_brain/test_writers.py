"""Result files carry the FeTA names and colours (``.seg.nrrd``) and the input's geometry."""

import nibabel as nib
import numpy as np
import pytest
import slicerio

from apps.fetal_brain.lib.volumes import read_seg_nrrd
from apps.fetal_brain.lib.writers import check_extension, present_values, write_result, write_seg_nrrd
from fetalseg.labels import all_labels
from tests.apps.fetal_brain.conftest import AFFINES


def test_seg_nrrd_round_trip_keeps_values_names_colours_and_geometry(tmp_path):
    label = np.zeros((6, 7, 8), np.uint8)
    label[1:3, 1:4, 2:6] = 7
    label[4:6, 0:2, 0:3] = 2
    path = write_seg_nrrd(label, AFFINES["permuted-PIR"], tmp_path / "x.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == [lab.display_name for lab in all_labels()[1:]]
    back = read_seg_nrrd(path)
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_allclose(back.affine, AFFINES["permuted-PIR"], atol=1e-6)


def test_write_result_picks_the_format_from_the_name(tmp_path):
    label = np.arange(4 * 5 * 6).reshape(4, 5, 6) % 8
    nii = write_result(label, AFFINES["LPS-anisotropic"], tmp_path / "a.nii.gz")
    img = nib.load(str(nii))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)
    np.testing.assert_allclose(img.affine, AFFINES["LPS-anisotropic"])


def test_plain_nrrd_reads_back_on_the_same_grid(tmp_path):
    from fetalseg.data.io import read_volume

    label = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 8).astype(np.uint8)
    path = write_result(label, AFFINES["permuted-PIR"], tmp_path / "a.nrrd")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_allclose(back.affine, AFFINES["permuted-PIR"], atol=1e-6)


@pytest.mark.parametrize(
    ("given", "expected"), [("nii.gz", ".nii.gz"), (".SEG.NRRD", ".seg.nrrd"), (".nii", ".nii"), ("nrrd", ".nrrd")]
)
def test_check_extension_normalises(given, expected):
    assert check_extension(given) == expected


@pytest.mark.parametrize("bad", [".png", "exe", "../x.nii.gz", ""])
def test_check_extension_refuses_other_formats(bad):
    with pytest.raises(ValueError, match="result_extension"):
        check_extension(bad)


def test_present_values_and_segment_extents(tmp_path):
    label = np.zeros((5, 6, 7), np.uint8)
    label[1:3, 2:5, 6] = 4
    label[0, 0, 0] = 1
    assert present_values(label) == [0, 1, 4]
    assert present_values(np.zeros((2, 2, 2), np.uint8)) == [0]
    seg = write_seg_nrrd(label, np.eye(4), tmp_path / "e.seg.nrrd")
    extents = {s["labelValue"]: s["extent"] for s in slicerio.read_segmentation(str(seg))["segments"]}
    assert extents[4] == [1, 2, 2, 4, 6, 6] and extents[1] == [0, 0, 0, 0, 0, 0]
