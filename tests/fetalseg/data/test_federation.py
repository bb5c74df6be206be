"""Multi-site federation writer: exact FeTA BIDS layout, readable NIfTI, atomic and deterministic writes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fetalseg.data import federation as fed
from fetalseg.data.federation import FEDERATION_FILE, case_paths, write_federation, write_site
from fetalseg.data.phantom import DEFAULT_SITES, GA_MAX, GA_MIN, SiteProfile, site_profiles
from fetalseg.labels import label_ids

L = label_ids()
SITE_FILES = {"participants.tsv", "participants.json", "dataset_description.json"}


def _profiles(sites: list[Path]) -> list[SiteProfile]:
    summary = json.loads((sites[0].parent / FEDERATION_FILE).read_text())
    return [SiteProfile.from_dict(s["profile"]) for s in summary["sites"]]


def _participants(site: Path) -> list[dict[str, str]]:
    with open(site / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_exactly_feta_bids(tiny_federation: list[Path]) -> None:
    assert [s.name for s in tiny_federation] == ["site-1", "site-2", "site-3"]
    assert sorted(p.name for p in tiny_federation[0].parent.iterdir()) == [
        FEDERATION_FILE,
        "site-1",
        "site-2",
        "site-3",
    ]
    for site, profile in zip(tiny_federation, _profiles(tiny_federation)):
        entries = {p.name for p in site.iterdir()}
        assert entries == SITE_FILES | {f"sub-{i:03d}" for i in range(1, 5)}
        pattern = re.compile(rf"^(sub-\d{{3}})_rec-{profile.rec_method}_(T2w|dseg)\.nii\.gz$")
        for sub in sorted(site.glob("sub-*")):
            assert [p.name for p in sub.iterdir()] == ["anat"]
            names = sorted(p.name for p in (sub / "anat").iterdir())
            assert len(names) == 2
            assert all(pattern.match(n) and pattern.match(n).group(1) == sub.name for n in names), names
            assert names == sorted(p.name for p in case_paths(site, sub.name, profile.rec_method))


def test_images_and_labels_load_and_match(tiny_federation: list[Path]) -> None:
    for site, profile in zip(tiny_federation, _profiles(tiny_federation)):
        for sub in sorted(site.glob("sub-*")):
            image_path, label_path = case_paths(site, sub.name, profile.rec_method)
            img, lab = nib.load(str(image_path)), nib.load(str(label_path))
            assert img.shape == lab.shape == (32, 32, 32)
            np.testing.assert_allclose(img.affine, lab.affine)
            for nii in (img, lab):
                assert int(nii.header["qform_code"]) > 0 and int(nii.header["sform_code"]) > 0
                np.testing.assert_allclose(nii.get_qform(), nii.get_sform(), atol=1e-5)
            assert img.get_data_dtype() == np.float32
            assert np.issubdtype(lab.get_data_dtype(), np.integer)
            label = np.asarray(lab.dataobj)
            assert set(np.unique(label)) == set(L.values())  # background + all 7 tissues
            assert np.asarray(img.dataobj).min() >= 0
            assert "".join(nib.aff2axcodes(img.affine)) == profile.orientation


def test_participants_and_description(tiny_federation: list[Path]) -> None:
    for site, profile in zip(tiny_federation, _profiles(tiny_federation)):
        header = (site / "participants.tsv").read_text().splitlines()[0].split("\t")
        assert header[:3] == ["participant_id", "Pathology", "Gestational age"]
        rows = _participants(site)
        assert [r["participant_id"] for r in rows] == sorted(p.name for p in site.glob("sub-*"))
        for row in rows:
            assert GA_MIN <= float(row["Gestational age"]) <= GA_MAX
            assert row["Pathology"] == "Neurotypical" and row["site"] == profile.name
        desc = json.loads((site / "dataset_description.json").read_text())
        assert desc["Name"] and desc["BIDSVersion"].startswith("1.")
        generated = desc["GeneratedBy"][0]
        assert generated["Name"] == "fetalseg"
        assert SiteProfile.from_dict(generated["Parameters"]["profile"]) == profile
        assert isinstance(generated["Parameters"]["seed"], int)


def test_federation_summary_and_site_heterogeneity(tiny_federation: list[Path]) -> None:
    summary = json.loads((tiny_federation[0].parent / FEDERATION_FILE).read_text())
    assert summary["seed"] == 0 and summary["shape"] == [32, 32, 32] and summary["cases_per_site"] == 4
    assert _profiles(tiny_federation) == site_profiles(3, seed=0)
    assert len({s["seed"] for s in summary["sites"]}) == 3

    spacings, wm_gm = [], []
    for site, profile in zip(tiny_federation, _profiles(tiny_federation)):
        image_path, label_path = case_paths(site, "sub-001", profile.rec_method)
        img = nib.load(str(image_path))
        spacings.append(tuple(np.round(img.header.get_zooms(), 3)))
        ratios = []
        for sub in sorted(site.glob("sub-*")):
            image_path, label_path = case_paths(site, sub.name, profile.rec_method)
            image = nib.load(str(image_path)).get_fdata()
            label = np.asarray(nib.load(str(label_path)).dataobj)
            ratios.append(image[label == L["white_matter"]].mean() / image[label == L["grey_matter"]].mean())
        wm_gm.append(float(np.mean(ratios)))
    assert len(set(spacings)) == 3  # voxel sizes differ between sites
    assert max(wm_gm) - min(wm_gm) > 0.1  # grey/white contrast differs between sites


def test_write_site_is_deterministic_and_subject_stable(tmp_path: Path) -> None:
    profile = DEFAULT_SITES[2]
    a = write_site(tmp_path / "a", profile, n_cases=2, shape=(32, 32, 32), seed=11)
    b = write_site(tmp_path / "b", profile, n_cases=2, shape=(32, 32, 32), seed=11)
    tree_a, tree_b = _tree(a), _tree(b)
    assert tree_a.keys() == tree_b.keys()
    for name in tree_a:  # compare voxels, not gzip bytes (gzip headers may hold a timestamp)
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(nib.load(str(a / name)).dataobj, nib.load(str(b / name)).dataobj)
        else:
            assert tree_a[name] == tree_b[name], name
    # a subject depends only on (seed, subject number), not on how many cases are written around it
    c = write_site(tmp_path / "c", profile, n_cases=1, shape=(32, 32, 32), seed=11, first_subject=2)
    assert [p.name for p in c.glob("sub-*")] == ["sub-002"]
    for x, y in zip(case_paths(a, "sub-002", profile.rec_method), case_paths(c, "sub-002", profile.rec_method)):
        np.testing.assert_array_equal(nib.load(str(x)).dataobj, nib.load(str(y)).dataobj)
    assert _participants(c)[0] == _participants(a)[1]
    d = write_site(tmp_path / "d", profile, n_cases=2, shape=(32, 32, 32), seed=12)
    labels_a = case_paths(a, "sub-001", profile.rec_method)[1]
    labels_d = case_paths(d, "sub-001", profile.rec_method)[1]
    assert not np.array_equal(nib.load(str(labels_a)).dataobj, nib.load(str(labels_d)).dataobj)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    profile = DEFAULT_SITES[0]
    site = tmp_path / "site"
    site.mkdir()
    write_site(site, profile, n_cases=1, shape=(16, 16, 16), seed=0)  # an existing empty folder is fine
    before = _tree(site)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_site(site, profile, n_cases=1, shape=(16, 16, 16), seed=1)
    assert _tree(site) == before
    write_site(site, profile, n_cases=2, shape=(16, 16, 16), seed=1, overwrite=True)
    assert {p.name for p in site.glob("sub-*")} == {"sub-001", "sub-002"}
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no staging or trash folders left behind


def test_federation_checks_every_target_before_writing(tmp_path: Path) -> None:
    (tmp_path / "site-2").mkdir()
    (tmp_path / "site-2" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="site-2"):
        write_federation(tmp_path, n_sites=2, cases_per_site=1, shape=(16, 16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-2"]
    assert (tmp_path / "site-2" / "keep.txt").read_text() == "mine"
    sites = write_federation(tmp_path, n_sites=2, cases_per_site=1, shape=(16, 16, 16), overwrite=True, progress=True)
    assert not (sites[1] / "keep.txt").exists()
    with pytest.raises(FileExistsError):
        write_federation(tmp_path, n_sites=1, cases_per_site=1, shape=(16, 16, 16))


def test_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = fed.generate_phantom

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(**kwargs)

    monkeypatch.setattr(fed, "generate_phantom", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_site(tmp_path / "site-1", DEFAULT_SITES[0], n_cases=3, shape=(16, 16, 16), seed=0)
    assert list(tmp_path.iterdir()) == []


def test_more_sites_than_defaults(tmp_path: Path) -> None:
    sites = write_federation(tmp_path, n_sites=4, cases_per_site=1, shape=(16, 16, 16), seed=3)
    assert [s.name for s in sites] == ["site-1", "site-2", "site-3", "site-4"]
    profiles = _profiles(sites)
    assert profiles == site_profiles(4, seed=3)
    img = nib.load(str(case_paths(sites[3], "sub-001", profiles[3].rec_method)[0]))
    assert "".join(nib.aff2axcodes(img.affine)) == profiles[3].orientation


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_cases"):
        write_site(tmp_path / "s", DEFAULT_SITES[0], n_cases=0, shape=(16, 16, 16), seed=0)
    with pytest.raises(ValueError, match="3-digit"):
        write_site(tmp_path / "s", DEFAULT_SITES[0], n_cases=2, shape=(16, 16, 16), seed=0, first_subject=999)
    with pytest.raises(ValueError, match="n_sites"):
        write_federation(tmp_path, n_sites=0)
    assert list(tmp_path.iterdir()) == []


def test_more_cases_are_the_subjects_a_larger_federation_would_have(tmp_path: Path) -> None:
    small = write_federation(tmp_path / "small", n_sites=2, cases_per_site=1, shape=(24, 24, 24), seed=5)
    large = write_federation(tmp_path / "large", n_sites=2, cases_per_site=3, shape=(24, 24, 24), seed=5)
    more = fed.write_more_cases(tmp_path / "small", tmp_path / "more", n_cases=2)
    assert [p.name for p in more] == [p.name for p in small]
    for site_more, site_large, profile in zip(more, large, _profiles(large)):
        assert sorted(p.name for p in site_more.glob("sub-*")) == ["sub-002", "sub-003"]
        for subject in ("sub-002", "sub-003"):
            for x, y in zip(
                case_paths(site_more, subject, profile.rec_method), case_paths(site_large, subject, profile.rec_method)
            ):
                np.testing.assert_array_equal(nib.load(str(x)).dataobj, nib.load(str(y)).dataobj)
        assert _participants(site_more) == _participants(site_large)[1:]
    with pytest.raises(FileExistsError):  # never silently replaced
        fed.write_more_cases(tmp_path / "small", tmp_path / "more", n_cases=1)
    with pytest.raises(ValueError, match="separate folder"):
        fed.write_more_cases(tmp_path / "small", tmp_path / "small", n_cases=1)
