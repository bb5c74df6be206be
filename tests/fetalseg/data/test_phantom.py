"""Synthetic phantoms: anatomy is plausible at every size and GA, sites differ, everything is deterministic."""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from fetalseg.data.phantom import (
    DEFAULT_SITES,
    GA_MAX,
    GA_MIN,
    Phantom,
    SiteProfile,
    _sample_anatomy,
    generate_phantom,
    site_profiles,
)
from fetalseg.labels import foreground_labels, label_ids

L = label_ids()
SHARP = DEFAULT_SITES[0]

# Share of each tissue among all labelled (non-background) voxels: wide bands around FeTA-like proportions.
PLAUSIBLE = {
    "external_csf": (0.15, 0.65),
    "grey_matter": (0.08, 0.35),
    "white_matter": (0.12, 0.50),
    "ventricles": (0.01, 0.10),
    "cerebellum": (0.015, 0.08),
    "deep_grey_matter": (0.005, 0.06),
    "brainstem": (0.002, 0.03),
}


def _phantom(size: int = 32, ga: float = 28.0, profile: SiteProfile = SHARP, seed: int = 0) -> Phantom:
    return generate_phantom(shape=(size, size, size), ga_weeks=ga, profile=profile, seed=seed)


def _fractions(label: np.ndarray) -> dict[str, float]:
    counts = np.bincount(label.ravel(), minlength=len(L))
    return {lab.name: counts[lab.value] / counts[1:].sum() for lab in foreground_labels()}


def _canonical(ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(ph.image, ph.affine))
    lab = nib.as_closest_canonical(nib.Nifti1Image(ph.label, ph.affine))
    return np.asarray(img.dataobj), np.asarray(lab.dataobj)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("ga", [20.0, 35.0])
def test_every_tissue_present_in_plausible_proportion(size: int, ga: float) -> None:
    ph = _phantom(size, ga, seed=3)
    assert ph.image.shape == ph.label.shape == (size, size, size)
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert np.isfinite(ph.image).all() and ph.image.min() >= 0
    assert set(np.unique(ph.label)) == set(L.values())
    for name, share in _fractions(ph.label).items():
        lo, hi = PLAUSIBLE[name]
        assert lo <= share <= hi, f"{name} is {share:.3f} of the brain at {size}³, GA {ga}"
    assert ph.ga_weeks == ga


@pytest.mark.parametrize("profile", DEFAULT_SITES, ids=lambda p: p.name)
def test_all_tissues_survive_coarse_grids_for_every_site(profile: SiteProfile) -> None:
    for ga in (GA_MIN, GA_MAX):
        for seed in range(3):
            labels = set(np.unique(_phantom(32, ga, profile, seed).label))
            assert labels == set(L.values()), (profile.name, ga, seed)


def test_brain_grows_and_folds_with_gestational_age() -> None:
    young, old = _phantom(64, 20.0, seed=1), _phantom(64, 35.0, seed=1)
    voxel_mm3 = float(np.prod(young.spacing))
    vol_young = (young.label > 0).sum() * voxel_mm3
    vol_old = (old.label > 0).sum() * voxel_mm3
    assert vol_old > 3.0 * vol_young  # BPD 45 -> 85 mm: volume grows ~6x

    def gyrification(label: np.ndarray) -> float:  # cortex volume relative to a smooth shell of the cerebrum
        cerebrum = np.isin(label, [L["grey_matter"], L["white_matter"]]).sum()
        return (label == L["grey_matter"]).sum() / cerebrum ** (2 / 3)

    assert gyrification(old.label) > 1.5 * gyrification(young.label)


def test_sulci_appear_and_deepen_with_age() -> None:
    def anatomy(ga: float):  # same random draws for every age
        return _sample_anatomy(ga, np.random.default_rng(0), min_feature=1.0)

    assert anatomy(20.0).sulci == ()
    depths = [sum(s.depth_mm for s in anatomy(ga).sulci) for ga in (24.0, 29.0, 35.0)]
    assert depths[0] < depths[1] < depths[2]


def test_tissue_intensity_order_follows_t2_contrast() -> None:
    ph = _phantom(64, 30.0, SHARP, seed=2)
    mean = {name: float(ph.image[ph.label == value].mean()) for name, value in L.items()}
    assert mean["external_csf"] > mean["white_matter"] > mean["grey_matter"]
    assert mean["ventricles"] > mean["white_matter"] > mean["deep_grey_matter"]
    assert mean["white_matter"] > mean["brainstem"]
    assert mean["background"] < 0.2 * mean["external_csf"]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a, b, c = _phantom(seed=5), _phantom(seed=5), _phantom(seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("profile", DEFAULT_SITES, ids=lambda p: p.name)
def test_orientation_and_spacing_follow_the_profile(profile: SiteProfile) -> None:
    shape = (40, 32, 36)
    ph = generate_phantom(shape=shape, ga_weeks=26.0, profile=profile, seed=0, fov_mm=120.0)
    assert ph.image.shape == ph.label.shape == shape
    assert "".join(nib.aff2axcodes(ph.affine)) == profile.orientation == ph.axcodes
    np.testing.assert_allclose(ph.spacing, [120.0 / s * profile.spacing_scale for s in shape], rtol=1e-6)


def test_reorientation_keeps_the_anatomy_in_place() -> None:
    """Same case written RAS or PIR: identical once both are brought back to canonical orientation."""
    ras = _phantom(32, 27.0, replace(SHARP, orientation="RAS"), seed=4)
    pir = _phantom(32, 27.0, replace(SHARP, orientation="PIR"), seed=4)
    assert not np.array_equal(ras.label, pir.label)
    img_r, lab_r = _canonical(ras)
    img_p, lab_p = _canonical(pir)
    np.testing.assert_array_equal(lab_r, lab_p)
    np.testing.assert_allclose(img_r, img_p, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(nib.as_closest_canonical(nib.Nifti1Image(pir.label, pir.affine)).affine, ras.affine)
    # the head sits near the world origin (centre of the field of view)
    centre = nib.affines.apply_affine(ras.affine, np.argwhere(ras.label > 0).mean(axis=0))
    assert np.all(np.abs(centre) < 15.0)


def test_sites_differ_measurably() -> None:
    """Contrast, blur and noise differ between the default sites for the same anatomy."""
    stats = {}
    for profile in DEFAULT_SITES:
        ph = _phantom(48, 30.0, profile, seed=7)
        img = ph.image / np.percentile(ph.image[ph.label > 0], 99)
        mean = {name: float(img[ph.label == value].mean()) for name, value in L.items()}
        grad = np.sqrt(sum(g**2 for g in np.gradient(img)))
        stats[profile.name] = {
            "gm_wm": mean["grey_matter"] / mean["white_matter"],
            "wm_csf": mean["white_matter"] / mean["external_csf"],
            "sharpness": float(grad[ph.label > 0].mean()),
        }
    a, b, c = (stats[p.name] for p in DEFAULT_SITES)
    assert b["gm_wm"] > a["gm_wm"] + 0.15  # weak grey/white contrast at the blurred site
    assert c["wm_csf"] > a["wm_csf"] + 0.1  # gamma < 1 pushes WM towards CSF at the noisy site
    assert b["sharpness"] < 0.8 * a["sharpness"]
    spacings = {round(_phantom(32, 25.0, p).spacing[0], 3) for p in DEFAULT_SITES}
    assert len(spacings) == len(DEFAULT_SITES)
    assert len({p.orientation for p in DEFAULT_SITES}) == len(DEFAULT_SITES)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="ga_weeks"):
        _phantom(ga=19.0)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(shape=(32, 32), ga_weeks=25.0, profile=SHARP, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="orientation"):
        replace(SHARP, orientation="RAR")
    with pytest.raises(ValueError, match="tissue_t2"):
        replace(SHARP, tissue_t2={"white_matter": 0.5})
    with pytest.raises(ValueError, match="rec_method"):
        replace(SHARP, rec_method="mial-srr")


def test_site_profiles_defaults_first_then_deterministic_variants() -> None:
    assert site_profiles(2) == list(DEFAULT_SITES[:2])
    five = site_profiles(5, seed=1)
    assert five[:3] == list(DEFAULT_SITES)
    assert five == site_profiles(5, seed=1)
    assert five[3:] != site_profiles(5, seed=2)[3:]
    assert len({p.name for p in five}) == 5
    for p in five[3:]:
        assert 0.9 <= p.spacing_scale <= 1.15
        assert GA_MIN < p.ga_mean < GA_MAX
        assert p.tissue_t2["external_csf"] == 1.0


def test_profile_round_trips_through_json_and_is_hashable() -> None:
    for p in site_profiles(4):
        again = SiteProfile.from_dict(p.to_dict())
        assert again == p and hash(again) == hash(p)
    assert len(set(DEFAULT_SITES)) == len(DEFAULT_SITES)


def test_ga_sampling_is_clipped_to_feta_range() -> None:
    wide = replace(SHARP, ga_mean=27.5, ga_sd=20.0)
    rng = np.random.default_rng(0)
    ages = [wide.sample_ga(rng) for _ in range(200)]
    assert min(ages) == GA_MIN and max(ages) == GA_MAX


@pytest.mark.slow
def test_feta_size_volume_has_feta_geometry_and_labels() -> None:
    ph = generate_phantom(shape=(256, 256, 256), ga_weeks=33.0, profile=SHARP, seed=0)
    np.testing.assert_allclose(ph.spacing, (0.5, 0.5, 0.5))
    assert set(np.unique(ph.label)) == set(L.values())
