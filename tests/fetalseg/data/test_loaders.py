import shutil

import numpy as np
import pytest

from fetalseg.data.io import write_nifti
from fetalseg.data.loaders import load_dataset, load_feta_bids, split_cases
from fetalseg.data.validation import DataValidationError
from tests.conftest import sphere_case


def _bids(root, n=3, *, with_labels=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "participants.tsv").write_text(
        "participant_id\tPathology\tGestational age\n"
        + "".join(f"sub-{i:03d}\tNeurotypical\t{25 + i}\n" for i in range(1, n + 1))
    )
    for i in range(1, n + 1):
        anat = root / f"sub-{i:03d}" / "anat"
        image, label, affine = sphere_case(seed=i)
        write_nifti(image, affine, anat / f"sub-{i:03d}_rec-mial_T2w.nii.gz")
        if with_labels:
            write_nifti(label, affine, anat / f"sub-{i:03d}_rec-mial_dseg.nii.gz", dtype=np.uint8)
    return root


def test_feta_bids_layout(tmp_path):
    root = _bids(tmp_path / "site-A")
    cases = load_dataset(root)
    assert [c.case_id for c in cases] == [f"site-A/sub-{i:03d}_rec-mial_T2w" for i in (1, 2, 3)]
    assert all(c.label is not None and c.label.name.endswith("_dseg.nii.gz") for c in cases)
    assert [c.ga_weeks for c in cases] == [26.0, 27.0, 28.0]
    assert {c.site for c in cases} == {"site-A"}
    item = cases[0].as_item()
    assert set(item) >= {"image", "label", "case_id", "site"}


def test_generated_federation_is_read_as_bids(tiny_federation):
    for site in tiny_federation:
        cases = load_dataset(site)
        assert len(cases) == 4 and all(c.label and c.ga_weeks for c in cases)


def test_bids_missing_label_is_reported(tmp_path):
    root = _bids(tmp_path / "site-B", n=2, with_labels=False)
    with pytest.raises(DataValidationError, match="has no label"):
        load_dataset(root)
    assert len(load_feta_bids(root)) == 2
    assert len(load_dataset(root, require_labels=False)) == 2


def test_images_labels_folders(tmp_path):
    for i in range(2):
        image, label, affine = sphere_case(seed=i)
        write_nifti(image, affine, tmp_path / "ds" / "images" / f"c{i}.nii.gz")
        write_nifti(label, affine, tmp_path / "ds" / "labels" / f"c{i}.nii.gz", dtype=np.uint8)
    cases = load_dataset(tmp_path / "ds")
    assert [c.case_id for c in cases] == ["ds/c0", "ds/c1"]


def test_flat_folder_and_monailabel_datastore(tmp_path, write_case):
    write_case("flat", folder=tmp_path / "flat")
    assert len(load_dataset(tmp_path / "flat")) == 1
    store = tmp_path / "store"
    _, lab = write_case("x", folder=store)
    (store / "labels" / "final").mkdir(parents=True)
    shutil.move(lab, store / "labels" / "final" / "x.nii.gz")
    cases = load_dataset(store)
    assert cases[0].label == store / "labels" / "final" / "x.nii.gz"


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="no images found"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataValidationError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_all_problems_reported_at_once(tmp_path, write_case):
    write_case("good", folder=tmp_path / "ds")
    (tmp_path / "ds" / "bad.nii.gz").write_bytes(b"corrupt")
    image, label, affine = sphere_case()
    label[0, 0, 0] = 12
    write_nifti(image, affine, tmp_path / "ds" / "lab.nii.gz")
    write_nifti(label, affine, tmp_path / "ds" / "lab_seg.nii.gz", dtype=np.uint8)
    with pytest.raises(DataValidationError) as err:
        load_dataset(tmp_path / "ds")
    text = str(err.value)
    assert "2 problems" in text and "bad.nii.gz" in text and "outside 0..7: 12" in text


def test_split_is_deterministic_per_site_and_disjoint(tiny_federation):
    cases = [c for site in tiny_federation for c in load_dataset(site)]
    train, held = split_cases(cases, val_fraction=0.25, seed=0)
    again = split_cases(cases, val_fraction=0.25, seed=0)
    assert (train, held) == again
    assert not {c.case_id for c in train} & {c.case_id for c in held}
    assert {c.site for c in held} == {c.site for c in cases}  # every site keeps held-out cases
    with pytest.raises(ValueError):
        split_cases(cases, val_fraction=1.0)
