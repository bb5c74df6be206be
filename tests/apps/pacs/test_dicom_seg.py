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


# The expected codes typed once here, as the test's own table (DICOM PS3.16 CID 7153 / 7140), keyed by the codes'
# meanings rather than label names so this file is not a second label table: the bundle must carry exactly these.
EXPECTED_TYPES = {
    ("SCT", "33930006"),  # cranial subarachnoid space (external CSF)
    ("SCT", "40146001"),  # cerebral cortex (grey matter)
    ("SCT", "68523003"),  # cerebral white matter
    ("SCT", "35764002"),  # brain ventricle
    ("SCT", "113305005"),  # cerebellum
    ("FMA", "223151"),  # subcortical grey matter (deep grey matter)
    ("SCT", "119238007"),  # brain stem
}


def test_each_segment_has_its_tissues_anatomic_code(tmp_path):
    """Every segment of a written SEG, read back with pydicom, carries its own tissue's codes from the bundle (no
    generic "Tissue" code), and the seven tissues have seven different type codes."""
    import pydicom_seg

    case = generate_phantom(shape=(20, 22, 18), ga_weeks=28.0, profile=site_profiles(1)[0], seed=3)
    write_dicom_series(case.image, case.affine, tmp_path / "s", patient_id="P1")
    grid = read_dicom_series(tmp_path / "s").affine
    path = write_seg_file(label_to_seg(case.label, grid, tmp_path / "s", tag="original", algorithm="t"), tmp_path / "x")
    seg = pydicom.dcmread(str(path))
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert set(by_number) == {lab.value for lab in foreground_labels()}
    seen = set()
    for lab in foreground_labels():
        item = by_number[lab.value]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == tuple(lab.type_code)
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "91723000")  # anatomical structure
        assert kind.CodeValue != "85756007", f"{lab.name} still coded as generic Tissue"
        seen.add((kind.CodingSchemeDesignator, kind.CodeValue))
    assert seen == EXPECTED_TYPES
    # still a SEG that pydicom-seg reads back to the label, voxel by voxel
    decoded = pydicom_seg.MultiClassReader().read(seg)
    assert decoded.segment_infos.keys() == by_number.keys()
    back, _ = seg_to_label(seg, tmp_path / "s")
    assert np.array_equal(back, case.label)
