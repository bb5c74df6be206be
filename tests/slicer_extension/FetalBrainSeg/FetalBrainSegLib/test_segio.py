""".seg.nrrd written here is what Slicer's developers' reader (slicerio) and pynrrd see: names, colours, label
values and geometry survive; Slicer-style files (cropped extent, several layers) read back onto the image grid."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import slicerio
from FetalBrainSegLib.errors import CorrectionInvalidError
from FetalBrainSegLib.segio import align_to_grid, read_seg_nrrd, write_seg_nrrd
from FetalBrainSegLib.volumeio import LPS_TO_RAS, Geometry, Volume


def test_round_trip_through_slicerio_and_pynrrd(tmp_path, labelset, phantom):
    path = write_seg_nrrd(tmp_path / "case.seg.nrrd", Volume(phantom.label, phantom.affine), labelset)

    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], LPS_TO_RAS @ phantom.affine, atol=1e-12)
    np.testing.assert_array_equal(seg["voxels"], phantom.label)
    by_id = {s["id"]: s for s in seg["segments"]}
    assert list(by_id) == list(labelset.names)  # every tissue present, in value order, even if empty
    for lab in labelset.labels:
        s = by_id[lab.name]
        assert s["name"] == lab.display_name
        assert s["labelValue"] == lab.value
        assert s["layer"] == 0
        np.testing.assert_allclose(s["color"], lab.color_float, atol=1e-6)
        np.testing.assert_array_equal(slicerio.segment_mask(seg, s), phantom.label == lab.value)
        mask = phantom.label == lab.value
        if mask.any():
            idx = np.argwhere(mask)
            assert s["extent"] == [int(v) for pair in zip(idx.min(0), idx.max(0)) for v in pair]
        else:
            assert s["extent"] == [0, -1, 0, -1, 0, -1]
    assert seg["masterRepresentation"] == "Binary labelmap"

    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, phantom.label)

    back = read_seg_nrrd(path)
    vol = back.to_label_volume(labelset)
    np.testing.assert_array_equal(vol.array, phantom.label)
    np.testing.assert_array_equal(vol.affine, phantom.affine)


def test_reads_a_file_written_by_slicerio_with_overlapping_layers(tmp_path, labelset, phantom):
    """Slicer writes one layer per group of overlapping segments; names are the display names it shows."""
    seg = slicerio.create_segmentation(phantom.label.shape, LPS_TO_RAS @ phantom.affine)
    for lab in labelset.labels:
        slicerio.add_segment(
            seg, phantom.label == lab.value, {"name": lab.display_name, "color": list(lab.color_float)}
        )
    slicerio.write_segmentation(str(tmp_path / "s.seg.nrrd"), seg)
    back = read_seg_nrrd(tmp_path / "s.seg.nrrd")
    assert [s.name for s in back.segments] == labelset.display_names()
    vol = back.to_label_volume(labelset)
    np.testing.assert_array_equal(vol.array, phantom.label)
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-9)

    # a second segment named like an existing tissue, overlapping another one: Slicer puts it in a new layer
    slicerio.add_segment(seg, phantom.label == labelset.labels[0].value, {"name": labelset.labels[1].display_name})
    slicerio.write_segmentation(str(tmp_path / "o.seg.nrrd"), seg)
    two_layers = read_seg_nrrd(tmp_path / "o.seg.nrrd")
    assert two_layers.layers.shape[0] == 2
    with pytest.raises(CorrectionInvalidError, match=r"Two segments are both|overlaps"):
        two_layers.to_label_volume(labelset)


def test_a_cropped_segmentation_is_placed_back_on_the_image_grid(labelset, phantom):
    grid = Geometry(phantom.label.shape, phantom.affine)
    crop = phantom.label[3:20, 5:30, 2:31]
    shifted = phantom.affine.copy()
    shifted[:3, 3] = (phantom.affine @ np.array([3, 5, 2, 1]))[:3]
    full = align_to_grid(Volume(crop, shifted), grid)
    expected = np.zeros_like(phantom.label)
    expected[3:20, 5:30, 2:31] = crop
    np.testing.assert_array_equal(full.array, expected)

    half = phantom.affine.copy()
    half[:3, 3] = (phantom.affine @ np.array([0.5, 0, 0, 1]))[:3]
    with pytest.raises(CorrectionInvalidError, match="fraction of a voxel"):
        align_to_grid(Volume(crop, half), grid)
    outside = phantom.affine.copy()
    outside[:3, 3] = (phantom.affine @ np.array([20, 0, 0, 1]))[:3]
    with pytest.raises(CorrectionInvalidError, match="outside the image"):
        align_to_grid(Volume(crop, outside), grid)
    other_spacing = phantom.affine @ np.diag([2.0, 1, 1, 1])
    with pytest.raises(CorrectionInvalidError, match="voxel size or orientation"):
        align_to_grid(Volume(crop, other_spacing), grid)


def test_values_outside_the_servers_labels_are_not_written(tmp_path, labelset):
    bad = np.zeros((4, 4, 4), np.uint8)
    bad[0, 0, 0] = labelset.max_value + 1
    with pytest.raises(CorrectionInvalidError, match="not tissues"):
        write_seg_nrrd(tmp_path / "bad.seg.nrrd", Volume(bad, np.eye(4)), labelset)
    assert not (tmp_path / "bad.seg.nrrd").exists()
