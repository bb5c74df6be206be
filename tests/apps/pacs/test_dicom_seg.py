"""DICOM SEG writing/reading without a PACS: voxels, geometry, names/colours, references, refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from apps.fetal_brain.lib.dicom_seg import EmptySegmentationError, label_to_seg, seg_to_label, write_seg_file
from apps.fetal_brain.lib.errors import UnprocessableError
from fetalseg.data.dicom_series import write_dicom_series
from fetalseg.data.io import read_dicom_series
from fetalseg.data.phantom import generate_phantom, site_profiles
from fetalseg.labels import foreground_labels

OBLIQUE = np.array([[0, 0, 2.5, 0], [-2.2, 0, 0, 0], [0, -1.9, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("permuted", [False, True], ids=["phantom-grid", "permuted-grid"])
def test_seg_round_trip_equals_label(tmp_path, permuted):
    case = generate_phantom(shape=(20, 22, 18), ga_weeks=26.0, profile=site_profiles(1)[0], seed=2)
    affine = OBLIQUE if permuted else case.affine
    write_dicom_series(case.image, affine, tmp_path / "s", patient_id="P1")
    grid = read_dicom_series(tmp_path / "s").affine
    seg = label_to_seg(case.label, grid, tmp_path / "s", tag="final", algorithm="test")
    path = write_seg_file(seg, tmp_path / "seg.dcm")
    back, back_affine = seg_to_label(pydicom.dcmread(str(path)), tmp_path / "s")
    assert np.array_equal(back, case.label)
    np.testing.assert_allclose(back_affine, grid, atol=1e-4)
    source = pydicom.dcmread(str(sorted((tmp_path / "s").iterdir())[0]), stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    for lab in foreground_labels():
        assert by_number[lab.value].SegmentLabel == lab.display_name
        assert len(by_number[lab.value].RecommendedDisplayCIELabValue) == 3


def test_empty_or_off_grid_labels_are_refused(tmp_path):
    image = np.random.default_rng(0).random((6, 7, 5))
    write_dicom_series(image, np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "s", patient_id="P1")
    grid = read_dicom_series(tmp_path / "s").affine
    with pytest.raises(EmptySegmentationError):
        label_to_seg(np.zeros((6, 7, 5), np.uint8), grid, tmp_path / "s", tag="final", algorithm="t")
    with pytest.raises(UnprocessableError, match="shape"):
        label_to_seg(np.ones((6, 7, 4), np.uint8), grid, tmp_path / "s", tag="final", algorithm="t")
    with pytest.raises(UnprocessableError, match="affine"):
        label_to_seg(np.ones((6, 7, 5), np.uint8), np.eye(4), tmp_path / "s", tag="final", algorithm="t")


def test_seg_of_another_series_is_refused(tmp_path):
    image = np.random.default_rng(0).random((6, 7, 5))
    label = np.zeros((6, 7, 5), np.uint8)
    label[2:4, 2:5, 1:4] = 3
    for name in ("a", "b"):
        write_dicom_series(image, np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / name, patient_id="P1")
    seg = label_to_seg(label, read_dicom_series(tmp_path / "a").affine, tmp_path / "a", tag="final", algorithm="t")
    with pytest.raises(UnprocessableError, match="references series"):
        seg_to_label(seg, tmp_path / "b")
