"""The checking datastore: ids, contents and grids are checked before anything is written; DICOM folders count."""

import numpy as np
import pytest

from apps.fetal_brain.lib.datastore import FetalDatastore
from apps.fetal_brain.lib.errors import BadRequestError, ConflictError, NotFoundError, UnprocessableError
from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import AFFINES, snapshot, write_dicom_series
from tests.conftest import sphere_case


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "studies"
    image, label, affine = sphere_case(shape=(16, 16, 16))
    write_nifti(image, affine, folder / "a.nii.gz")
    write_nifti(label, affine, folder / "labels" / "final" / "a.nii.gz", dtype=np.uint8)
    write_nifti(image, affine, folder / "b.nii.gz")
    write_dicom_series(image * 10, affine, folder / "dcm1")
    return folder


@pytest.fixture
def datastore(studies):
    return FetalDatastore(studies, auto_reload=False)


def test_lists_files_and_dicom_folders(datastore):
    assert sorted(datastore.list_images()) == ["a", "b", "dcm1"]
    assert datastore.get_labeled_images() == ["a"]
    assert datastore.image_file("dcm1").is_dir()
    assert [c[0] for c in datastore.final_cases()] == ["a"]


def test_save_label_converts_and_checks(datastore, studies, tmp_path):
    _, label, affine = sphere_case(shape=(16, 16, 16))
    src = write_nifti(label.astype(np.int16), affine, tmp_path / "x.nii", dtype=np.int16)
    assert datastore.save_label("dcm1", str(src), "final", {"by": "test"}) == "dcm1"
    stored = studies / "labels" / "final" / "dcm1.nii.gz"
    assert stored.is_file() and datastore.get_label_info("dcm1", "final")["by"] == "test"
    before = snapshot(studies)
    with pytest.raises(UnprocessableError, match="shape"):
        datastore.save_label("b", str(write_nifti(label[:8], affine, tmp_path / "s.nii.gz")), "final", {})
    with pytest.raises(NotFoundError):
        datastore.save_label("zz", str(src), "final", {})
    with pytest.raises(BadRequestError):
        datastore.save_label("../a", str(src), "final", {})
    with pytest.raises(BadRequestError):
        datastore.save_label("b", str(src), "../x", {})
    with pytest.raises(BadRequestError, match="JSON object"):
        datastore.save_label("b", str(src), "final", ["not", "a", "dict"])
    assert snapshot(studies) == before


def test_add_image_checks_and_refuses_to_replace_labelled_images(datastore, studies, tmp_path):
    image, _, affine = sphere_case(shape=(12, 14, 10), affine=AFFINES["LPS-anisotropic"])
    src = write_nifti(image, affine, tmp_path / "new.nii.gz")
    assert datastore.add_image("c", str(src), {}) == "c"
    assert (studies / "c.nii.gz").read_bytes() == src.read_bytes()
    before = snapshot(studies)
    with pytest.raises(ConflictError):
        datastore.add_image("a", str(src), {})
    flat = write_nifti(np.zeros((10, 10, 1), np.float32), affine, tmp_path / "flat.nii.gz")
    with pytest.raises(UnprocessableError, match="2D"):
        datastore.add_image("d", str(flat), {})
    with pytest.raises(BadRequestError):
        datastore.add_image("../../d", str(src), {})
    assert snapshot(studies) == before
    assert not (studies / ".staging").exists() or not any((studies / ".staging").iterdir())


def test_replacing_an_unlabelled_image_with_another_format(datastore, studies, tmp_path):
    image, _, affine = sphere_case(shape=(12, 12, 12))
    folder = write_dicom_series(image * 5, affine, tmp_path / "series")
    datastore.add_image("b", str(folder), {})
    assert (studies / "b").is_dir() and not (studies / "b.nii.gz").exists()
    assert datastore.image_file("b") == (studies / "b").resolve()


def test_remove_checks_ids(datastore):
    with pytest.raises(BadRequestError):
        datastore.remove_image("../studies")
    with pytest.raises(NotFoundError):
        datastore.remove_image("nope")
    datastore.remove_image("dcm1")
    assert "dcm1" not in datastore.list_images()
