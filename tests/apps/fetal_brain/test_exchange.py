"""Exporting corrected cases gives a dataset folder the NVFlare client reads with fetalseg's load_dataset."""

import json

import nibabel as nib
import numpy as np
import pytest

from apps.fetal_brain.lib.datastore import FetalDatastore
from apps.fetal_brain.lib.errors import InputError, NotFoundError
from apps.fetal_brain.lib.exchange import export_cases
from fetalseg.data.io import write_nifti
from fetalseg.data.loaders import load_dataset
from tests.apps.fetal_brain.conftest import AFFINES, write_dicom_series
from tests.conftest import sphere_case


@pytest.fixture
def datastore(tmp_path):
    studies = tmp_path / "studies"
    for i, name in enumerate(["a", "b", "unlabelled"]):
        image, label, affine = sphere_case(shape=(16, 18, 14), seed=i, affine=AFFINES["LPS-anisotropic"])
        write_nifti(image, affine, studies / f"{name}.nii.gz")
        if name != "unlabelled":
            write_nifti(label, affine, studies / "labels" / "final" / f"{name}.nii.gz", dtype=np.uint8)
    image, label, affine = sphere_case(shape=(12, 12, 10), seed=5, affine=AFFINES["permuted-PIR"])
    write_dicom_series(image * 10, affine, studies / "dicom")
    write_nifti(label, affine, studies / "labels" / "final" / "dicom.nii.gz", dtype=np.uint8)
    bad = label.copy()
    bad[0, 0, 0] = 12  # a label dropped into the folder by hand, never checked by the API
    write_nifti(image, affine, studies / "handmade.nii.gz")
    write_nifti(bad, affine, studies / "labels" / "final" / "handmade.nii.gz", dtype=np.uint8)
    return FetalDatastore(studies, auto_reload=False)


def test_export_is_readable_by_load_dataset_and_skips_invalid_cases(datastore, tmp_path):
    out = tmp_path / "export" / "site-a"
    result = export_cases(datastore, out, site="site-a")
    assert result["exported"] == 3
    assert [s["id"] for s in result["skipped"]] == ["handmade"]
    cases = load_dataset(out, site="site-a")
    assert sorted(c.case_id for c in cases) == ["site-a/a", "site-a/b", "site-a/dicom"]
    dicom = next(c for c in cases if c.case_id.endswith("dicom"))
    image, label = nib.load(str(dicom.image)), nib.load(str(dicom.label))
    np.testing.assert_allclose(image.affine, AFFINES["permuted-PIR"], atol=1e-4)
    np.testing.assert_allclose(label.affine, image.affine)
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["site"] == "site-a" and len(manifest["cases"]) == 3


def test_export_refuses_to_overwrite_unless_asked(datastore, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_cases(datastore, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_cases(datastore, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "images").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_export_without_corrections_says_so(tmp_path):
    image, _, affine = sphere_case(shape=(10, 10, 10))
    write_nifti(image, affine, tmp_path / "s" / "x.nii.gz")
    with pytest.raises(NotFoundError, match="no corrected cases"):
        export_cases(FetalDatastore(tmp_path / "s", auto_reload=False), tmp_path / "out")
    assert not (tmp_path / "out").exists()
