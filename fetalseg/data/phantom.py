"""Synthetic fetal brain T2w phantoms with FeTA labels, and the acquisition-site profiles that make sites differ.

Why synthetic: real FeTA data cannot ship with the project or be downloaded at run time, yet every part of the
federation (training, evaluation, privacy attacks, the MONAI Label app) needs labelled volumes whose difficulty
and site heterogeneity resemble FeTA. The anatomy is built from implicit functions in physical millimetres (brain
frame: x left->right, y posterior->anterior, z inferior->superior) and rasterised at the voxel centres, so the same
case exists at any resolution; thin structures get a minimum size of a fraction of a voxel so they survive at 32³.
Each :class:`SiteProfile` then applies what really differs between FeTA centres: super-resolution method (PSF),
voxel spacing, on-disk orientation, tissue contrast, intensity mapping, noise and bias field.

Label values are never typed here: they come from :func:`fetalseg.labels.label_ids` (the bundle's metadata).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage
from scipy.spatial.transform import Rotation

from fetalseg.labels import foreground_labels, label_ids

log = logging.getLogger(__name__)

GA_MIN = 20.0
GA_MAX = 35.0
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_F32 = np.float32

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Site profiles
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """Everything that differs between acquisition sites (scanner, sequence, reconstruction, population)."""

    name: str
    rec_method: str  # BIDS ``rec-`` label of the super-resolution method, FeTA style ("mial", "irtk", "nmic")
    spacing_scale: float = 1.0  # multiplies the nominal spacing fov_mm / shape
    orientation: str = "RAS"  # nibabel axcodes of the arrays written to disk
    tissue_t2: Mapping[str, float] = field(default_factory=dict)  # label name -> relative T2 intensity (0..1)
    gamma: float = 1.0  # contrast mapping applied to the normalised image
    intensity_scale: float = 1000.0  # arbitrary scanner units
    noise_sigma: float = 0.02  # Rician noise sigma as a fraction of the image maximum
    psf_fwhm_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Gaussian PSF in anatomical (LR, PA, IS) order
    bias_strength: float = 0.1  # log-amplitude of the smooth multiplicative bias field
    ga_mean: float = 27.5  # gestational age distribution (weeks), clipped to GA_MIN..GA_MAX
    ga_sd: float = 3.5
    surround_t2: float = 0.0  # 0: brain-masked reconstruction; >0: maternal tissue band visible around the skull
    surround_mm: float = 6.0  # thickness of that band
    texture: float = 0.04  # within-tissue smooth texture amplitude (fraction)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tissue_t2", dict(self.tissue_t2))
        object.__setattr__(self, "psf_fwhm_mm", tuple(float(v) for v in self.psf_fwhm_mm))
        object.__setattr__(self, "orientation", str(self.orientation).upper())
        self._validate()

    def _validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9]+", self.rec_method):
            raise ValueError(f"rec_method must be a BIDS label (alphanumeric), got {self.rec_method!r}")
        _check_axcodes(self.orientation)
        wanted = {lab.name for lab in foreground_labels()}
        if set(self.tissue_t2) != wanted:
            raise ValueError(f"tissue_t2 must give exactly the tissues {sorted(wanted)}, got {sorted(self.tissue_t2)}")
        if len(self.psf_fwhm_mm) != 3 or min(self.psf_fwhm_mm) < 0:
            raise ValueError(f"psf_fwhm_mm must be three non-negative numbers, got {self.psf_fwhm_mm}")
        if self.spacing_scale <= 0 or self.gamma <= 0 or self.intensity_scale <= 0 or self.ga_sd < 0:
            raise ValueError("spacing_scale, gamma and intensity_scale must be > 0 and ga_sd >= 0")

    def __hash__(self) -> int:  # the dict field would make the generated hash fail
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (written into dataset_description.json and federation.json)."""
        data = asdict(self)
        data["tissue_t2"] = dict(self.tissue_t2)
        data["psf_fwhm_mm"] = list(self.psf_fwhm_mm)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteProfile:
        """Inverse of :meth:`to_dict`, so a federation can be regenerated from its summary."""
        return cls(**dict(data))

    def sample_ga(self, rng: np.random.Generator) -> float:
        """Draw one gestational age (weeks) from this site's population, clipped to the FeTA range."""
        return float(np.clip(rng.normal(self.ga_mean, self.ga_sd), GA_MIN, GA_MAX))


def _check_axcodes(codes: str) -> None:
    if len(codes) != 3 or {c for c in codes} - set("RLAPSI"):
        raise ValueError(f"orientation must be three nibabel axcodes like 'RAS', got {codes!r}")
    axes = sorted({"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c] for c in codes)
    if axes != [0, 1, 2]:
        raise ValueError(f"orientation {codes!r} must name each anatomical axis once")


def _t2(**values: float) -> dict[str, float]:
    """Tissue contrast by label name, checked against the bundle's labels when the profile is built."""
    return dict(values)


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    # A: sharp, high-contrast MIAL-SRR-like reconstruction; canonical orientation and nominal spacing.
    SiteProfile(
        name="mial-sharp",
        rec_method="mial",
        spacing_scale=1.0,
        orientation="RAS",
        tissue_t2=_t2(
            external_csf=1.0,
            grey_matter=0.36,
            white_matter=0.68,
            ventricles=0.96,
            cerebellum=0.46,
            deep_grey_matter=0.40,
            brainstem=0.33,
        ),
        gamma=1.0,
        intensity_scale=1000.0,
        noise_sigma=0.015,
        psf_fwhm_mm=(0.8, 0.8, 0.8),
        bias_strength=0.08,
        ga_mean=27.5,
        ga_sd=3.5,
    ),
    # B: IRTK-like, heavy blur along the slice (IS) direction, weak grey/white contrast, strong bias, larger
    # voxels, LPS arrays, unmasked (maternal tissue visible) and a younger population.
    SiteProfile(
        name="irtk-blurred",
        rec_method="irtk",
        spacing_scale=1.15,
        orientation="LPS",
        tissue_t2=_t2(
            external_csf=1.0,
            grey_matter=0.47,
            white_matter=0.64,
            ventricles=0.92,
            cerebellum=0.55,
            deep_grey_matter=0.50,
            brainstem=0.45,
        ),
        gamma=1.0,
        intensity_scale=400.0,
        noise_sigma=0.025,
        psf_fwhm_mm=(1.4, 1.4, 4.0),
        bias_strength=0.35,
        ga_mean=24.5,
        ga_sd=2.5,
        surround_t2=0.22,
        surround_mm=7.0,
    ),
    # C: NiftyMIC-like, compressed bright end (gamma < 1) so WM approaches CSF, high noise, moderate isotropic
    # blur, small voxels, PIR arrays and an older population.
    SiteProfile(
        name="nmic-noisy",
        rec_method="nmic",
        spacing_scale=0.93,
        orientation="PIR",
        tissue_t2=_t2(
            external_csf=1.0,
            grey_matter=0.30,
            white_matter=0.78,
            ventricles=1.0,
            cerebellum=0.52,
            deep_grey_matter=0.40,
            brainstem=0.30,
        ),
        gamma=0.55,
        intensity_scale=3000.0,
        noise_sigma=0.07,
        psf_fwhm_mm=(1.5, 1.5, 1.5),
        bias_strength=0.15,
        ga_mean=30.5,
        ga_sd=2.5,
    ),
)

_EXTRA_AXCODES = ("LAS", "RPI", "ASL", "SRP", "LIA", "IPL", "RSA", "PLS")


def site_profiles(n: int, seed: int = 0) -> list[SiteProfile]:
    """``n`` site profiles: the defaults first, then deterministic perturbations of them (for larger federations)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = list(DEFAULT_SITES[: min(n, len(DEFAULT_SITES))])
    for i in range(len(DEFAULT_SITES), n):
        base = DEFAULT_SITES[i % len(DEFAULT_SITES)]
        rng = np.random.default_rng([int(seed), i])
        out.append(_perturb(base, rng, name=f"{base.name}-{i + 1}"))
    return out


def _perturb(base: SiteProfile, rng: np.random.Generator, *, name: str) -> SiteProfile:
    def jitter(value: float, rel: float) -> float:
        return float(value * rng.uniform(1.0 - rel, 1.0 + rel))

    t2 = {
        k: (1.0 if k == "external_csf" else float(np.clip(jitter(v, 0.08), 0.1, 1.0)))
        for k, v in base.tissue_t2.items()
    }
    return replace(
        base,
        name=name,
        spacing_scale=float(np.clip(jitter(base.spacing_scale, 0.06), 0.9, 1.15)),
        orientation=str(rng.choice(_EXTRA_AXCODES)),
        tissue_t2=t2,
        gamma=jitter(base.gamma, 0.12),
        intensity_scale=jitter(base.intensity_scale, 0.5),
        noise_sigma=jitter(base.noise_sigma, 0.25),
        psf_fwhm_mm=tuple(jitter(v, 0.2) for v in base.psf_fwhm_mm),
        bias_strength=jitter(base.bias_strength, 0.25),
        ga_mean=float(np.clip(base.ga_mean + rng.uniform(-1.5, 1.5), GA_MIN + 2, GA_MAX - 2)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Phantom result
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One synthetic case: arrays in the profile's on-disk orientation and the affine that maps them to RAS mm."""

    image: np.ndarray  # float32, >= 0
    label: np.ndarray  # uint8 FeTA labels
    affine: np.ndarray  # 4x4
    ga_weeks: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def axcodes(self) -> str:
        """Orientation of the arrays, e.g. ``"LPS"``."""
        return "".join(nio.aff2axcodes(self.affine))


# ----------------------------------------------------------------------------------------------------------------
# Implicit-function helpers (all return a signed depth in mm: > 0 inside)
# ----------------------------------------------------------------------------------------------------------------


def _ellipsoid(c: Coords, center: tuple[float, float, float], semi: tuple[Any, Any, Any]) -> np.ndarray:
    """Approximate signed distance (positive inside) to an ellipsoid whose half-axes may vary per point."""
    ux, uy, uz = ((c[i] - _F32(center[i])) / semi[i] for i in range(3))
    k0 = np.sqrt(ux * ux + uy * uy + uz * uz)
    k1 = np.sqrt((ux / semi[0]) ** 2 + (uy / semi[1]) ** 2 + (uz / semi[2]) ** 2)
    small = float(min(np.min(s) for s in semi))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = k0 * (_F32(1.0) - k0) / k1
    return np.where(k1 > 1e-6, d, _F32(small)).astype(_F32, copy=False)


def _small_ellipsoid(c: Coords, center: np.ndarray, semi: np.ndarray, margin: float = 3.0) -> np.ndarray:
    """:func:`_ellipsoid` evaluated only in its bounding box (+ margin mm); -inf farther out. Saves time at 256³."""
    lo, hi = center - semi - margin, center + semi + margin
    sel = (c[0] > lo[0]) & (c[0] < hi[0]) & (c[1] > lo[1]) & (c[1] < hi[1]) & (c[2] > lo[2]) & (c[2] < hi[2])
    out = np.full(c[0].shape, -np.inf, dtype=_F32)
    if sel.any():
        out[sel] = _ellipsoid(tuple(ci[sel] for ci in c), tuple(center), tuple(semi))  # type: ignore[arg-type]
    return out


def _egg(c: Coords, semi6: np.ndarray, taper: float = 0.0) -> np.ndarray:
    """Ellipsoid with a different half-axis on each side (x-, x+, y-, y+, z-, z+): asymmetry, egg shape."""
    x, y, z = c
    sx = np.where(x < 0, _F32(semi6[0]), _F32(semi6[1]))
    if taper:
        sx = sx * (_F32(1.0) - _F32(taper) * np.clip(y / _F32(max(semi6[2], semi6[3])), -1.0, 1.0))
    sy = np.where(y < 0, _F32(semi6[2]), _F32(semi6[3]))
    sz = np.where(z < 0, _F32(semi6[4]), _F32(semi6[5]))
    return _ellipsoid(c, (0.0, 0.0, 0.0), (sx, sy, sz))


def _tube(
    c: Coords, points: np.ndarray, radii: np.ndarray, stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Signed depth inside a swept-sphere polyline (ventricles, brainstem): radius interpolated along segments.

    ``stretch`` > 1 along an axis elongates the cross-section along it (e.g. the tall, slit-like ventricle body).
    """
    best = np.full(c[0].shape, -np.inf, dtype=_F32)
    k = np.asarray(stretch, dtype=np.float64)
    lo = points.min(axis=0) - radii.max() * k
    hi = points.max(axis=0) + radii.max() * k
    sel = (c[0] > lo[0]) & (c[0] < hi[0]) & (c[1] > lo[1]) & (c[1] < hi[1]) & (c[2] > lo[2]) & (c[2] < hi[2])
    if not sel.any():
        return best
    x, y, z = (ci[sel] / _F32(ki) for ci, ki in zip(c, k))
    points = points / k
    sub = np.full(x.shape, -np.inf, dtype=_F32)
    for (a, b), (ra, rb) in zip(itertools.pairwise(points), itertools.pairwise(radii)):
        ab = (b - a).astype(_F32)
        den = _F32(max(float(ab @ ab), 1e-9))
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / den, 0.0, 1.0)
        dx, dy, dz = x - (a[0] + t * ab[0]), y - (a[1] + t * ab[1]), z - (a[2] + t * ab[2])
        depth = (_F32(ra) + t * _F32(rb - ra)) - np.sqrt(dx * dx + dy * dy + dz * dz)
        np.maximum(sub, depth, out=sub)
    best[sel] = sub
    return best


@dataclass(frozen=True)
class _Waves:
    """A smooth random field on the unit sphere, f(n) = sqrt(2/K) sum cos(freq * dir_k . n + phase_k)."""

    dirs: np.ndarray  # (K, 3)
    freq: float
    phases: np.ndarray  # (K,)

    @classmethod
    def random(cls, rng: np.random.Generator, *, k: int, freq: float) -> _Waves:
        dirs = rng.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return cls(dirs=dirs.astype(_F32), freq=float(freq), phases=rng.uniform(0, 2 * np.pi, k).astype(_F32))

    def value(self, n: Coords) -> np.ndarray:
        out = np.zeros(n[0].shape, dtype=_F32)
        for d, ph in zip(self.dirs, self.phases):
            out += np.cos(_F32(self.freq) * (d[0] * n[0] + d[1] * n[1] + d[2] * n[2]) + ph)
        return out * _F32(math.sqrt(2.0 / len(self.phases)))

    def value_and_tangent_grad(self, n: Coords) -> tuple[np.ndarray, np.ndarray]:
        """f and the norm of its gradient tangent to the sphere (needed to turn |f| into a distance)."""
        f = np.zeros(n[0].shape, dtype=_F32)
        g = [np.zeros(n[0].shape, dtype=_F32) for _ in range(3)]
        for d, ph in zip(self.dirs, self.phases):
            arg = _F32(self.freq) * (d[0] * n[0] + d[1] * n[1] + d[2] * n[2]) + ph
            f += np.cos(arg)
            s = np.sin(arg) * _F32(-self.freq)
            for i in range(3):
                g[i] += s * d[i]
        scale = _F32(math.sqrt(2.0 / len(self.phases)))
        radial = g[0] * n[0] + g[1] * n[1] + g[2] * n[2]
        gt = np.sqrt(sum((g[i] - radial * n[i]) ** 2 for i in range(3)))
        return f * scale, gt * scale


def _ramp(value: float, start: float, end: float) -> float:
    return float(np.clip((value - start) / (end - start), 0.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Per-case anatomy
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SulcusLevel:
    waves: _Waves  # zero set = sulcal lines
    gate: _Waves  # > threshold = where along the lines a sulcus exists (breaks loops into segments)
    depth_mm: float
    gap_mm: float


@dataclass(frozen=True)
class _Anatomy:
    """All random, GA-dependent geometry of one case, in the brain frame (mm, cerebral centre at the origin)."""

    skull6: np.ndarray
    brain6: np.ndarray
    taper: float
    shape_waves: _Waves
    shape_amp: float
    cortex_mm: float
    fissure_mm: float
    cc_top: float
    cc_y: float
    cc_half: float
    sulci: tuple[_SulcusLevel, ...]
    sylvian: tuple[float, float, float, float]  # depth, gap, z0, slope
    pf_center: np.ndarray
    pf_semi: np.ndarray
    cb_parts: tuple[tuple[np.ndarray, np.ndarray], ...]
    stem_pts: np.ndarray
    stem_r: np.ndarray
    lv: tuple[tuple[np.ndarray, np.ndarray], ...]
    third_v: tuple[np.ndarray, np.ndarray]
    dgm: tuple[tuple[np.ndarray, np.ndarray], ...]
    subplate: float


def _sample_anatomy(ga: float, rng: np.random.Generator, *, min_feature: float) -> _Anatomy:
    """Draw one case. Sizes follow fetal biometry: BPD ~45 mm at 20 wk to ~85 mm at 35 wk, TCD ~ GA-ish."""
    g = (ga - GA_MIN) / (GA_MAX - GA_MIN)
    size = float(np.clip(rng.normal(1.0, 0.035), 0.94, 1.06))
    bpd = (45.0 + 40.0 * g) * size
    ofd = bpd * float(np.clip(rng.normal(1.2, 0.025), 1.15, 1.25))
    height = bpd * float(np.clip(rng.normal(0.86, 0.02), 0.8, 0.92))
    asym = rng.uniform(-0.03, 0.03)
    csf = max(3.6 - 1.0 * g + rng.uniform(-0.4, 0.4), 0.8 * min_feature)
    skull6 = np.array(
        [bpd / 2 * (1 - asym), bpd / 2 * (1 + asym), ofd / 2 * 1.03, ofd / 2 * 0.97, height / 2 * 0.9, height / 2 * 1.1]
    )
    brain6 = skull6 - csf
    a = float(brain6[:2].mean())
    b_back, b_front = float(brain6[2]), float(brain6[3])
    c_inf, c_sup = float(brain6[4]), float(brain6[5])
    b = (b_back + b_front) / 2

    cortex = max((1.4 + 1.2 * g) * rng.uniform(0.92, 1.08), 0.7 * min_feature)
    lv = _lateral_ventricles(ga, rng, a=a, b=b, c=c_sup, min_feature=min_feature)
    body_top = max(float(p[1][2] + r[1]) for p, r in lv)
    cc_top = body_top + max(1.2 + 1.0 * g, 0.6 * min_feature)

    tcd = (20.0 + 24.0 * g) * rng.uniform(0.95, 1.05)  # transverse cerebellar diameter
    pf_center, pf_semi, cb_parts = _posterior_fossa(tcd, b_back=b_back, c_inf=c_inf)
    stem_pts, stem_r = _brainstem(a=a, b=b, c_sup=c_sup, c_inf=c_inf, pf_bottom=float(pf_center[2] - 0.25 * tcd))

    return _Anatomy(
        skull6=skull6,
        brain6=brain6,
        taper=float(rng.uniform(0.04, 0.09)),
        shape_waves=_Waves.random(rng, k=8, freq=2.0),
        shape_amp=float(0.02 * a),
        cortex_mm=float(cortex),
        fissure_mm=float(max(1.6 - 0.6 * g, 0.3 * min_feature)),
        cc_top=float(cc_top),
        cc_y=float(0.02 * b),
        cc_half=float(0.36 * b),
        sulci=_sulcus_levels(ga, rng, a=a),
        sylvian=(
            float((2.5 + 0.26 * a * g) * rng.uniform(0.9, 1.1)),
            float(max(5.0 - 3.8 * g, 1.0)),
            float(rng.uniform(-0.1, 0.0)),
            float(rng.uniform(-0.6, -0.4)),
        ),
        pf_center=pf_center,
        pf_semi=pf_semi,
        cb_parts=cb_parts,
        stem_pts=stem_pts,
        stem_r=np.maximum(stem_r, 0.6 * min_feature),
        lv=lv,
        third_v=(
            np.array([0.0, -0.05 * b, 0.02 * c_sup]),
            np.array([max(0.8, 0.4 * min_feature), 0.2 * b, 0.12 * c_sup]),
        ),
        dgm=_deep_grey(rng, a=a, b=b, c=c_sup),
        subplate=float(0.14 * (1.0 - g) + 0.03),
    )


def _posterior_fossa(
    tcd: float, *, b_back: float, c_inf: float
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[np.ndarray, np.ndarray], ...]]:
    """Posterior fossa (centre, half-axes) and the cerebellum in it: two hemispheres and the vermis."""
    center = np.array([0.0, -0.52 * b_back, -0.62 * c_inf])
    cb_si = 0.25 * tcd
    semi = np.array([tcd / 2 + 0.8, 0.34 * tcd + 0.8, cb_si + 0.8])
    hemispheres = [
        (center + np.array([s * tcd * 0.24, -0.02 * tcd, 0.0]), np.array([tcd * 0.27, 0.3 * tcd, cb_si]))
        for s in (-1, 1)
    ]
    vermis = (center + np.array([0.0, -0.02 * tcd, 0.03 * tcd]), np.array([tcd * 0.13, 0.33 * tcd, cb_si * 1.05]))
    return center, semi, (*hemispheres, vermis)


def _brainstem(*, a: float, b: float, c_sup: float, c_inf: float, pf_bottom: float) -> tuple[np.ndarray, np.ndarray]:
    """Midbrain (below the thalami) -> pons (anterior bulge) -> medulla, ending below the cerebellum."""
    r0 = 0.13 * a
    pts = np.array(
        [
            [0.0, -0.12 * b, -0.02 * c_sup],
            [0.0, -0.12 * b, -0.35 * c_inf],
            [0.0, -0.10 * b, -0.62 * c_inf],
            [0.0, -0.17 * b, pf_bottom + 0.4 * (-0.62 * c_inf - pf_bottom)],
            [0.0, -0.22 * b, pf_bottom - 0.15 * (-0.62 * c_inf - pf_bottom)],
        ]
    )
    return pts, np.array([r0, r0 * 1.05, r0 * 1.45, r0 * 1.0, r0 * 0.85])


def _sulcus_levels(ga: float, rng: np.random.Generator, *, a: float) -> tuple[_SulcusLevel, ...]:
    """Primary, secondary and tertiary sulci: each appears at its own age and deepens, so folding grows with GA."""
    levels = []
    # (freq on the unit sphere, number of waves, onset wk, full-depth wk, depth as fraction of the lateral half-axis)
    for freq, k, onset, full, depth_frac in (
        (4.0, 8, 22.0, 29.0, 0.26),
        (7.0, 10, 25.5, 32.0, 0.22),
        (11.0, 14, 28.5, 34.5, 0.16),
    ):
        onset += rng.uniform(-0.8, 0.8)
        depth = depth_frac * a * _ramp(ga, onset, full) * rng.uniform(0.9, 1.1)
        waves = _Waves.random(rng, k=k, freq=freq)
        gate = _Waves.random(rng, k=6, freq=freq * 0.6)
        levels.append(_SulcusLevel(waves=waves, gate=gate, depth_mm=float(depth), gap_mm=0.7))
    return tuple(lv for lv in levels if lv.depth_mm > 0.3)


def _lateral_ventricles(
    ga: float, rng: np.random.Generator, *, a: float, b: float, c: float, min_feature: float
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Paired C-shaped lateral ventricles (frontal horn, body, atrium, occipital and temporal horns).

    Absolute radii barely change with GA (atrial width stays ~6-8 mm) while the brain doubles, so the ventricles
    are relatively large at 20 weeks, as in real fetuses.
    """
    out = []
    grow = 1.0 + 0.01 * (ga - GA_MIN)
    for s in (-1.0, 1.0):
        k = rng.uniform(0.85, 1.15) * grow
        r = np.maximum(np.array([2.6, 3.2, 3.4, 3.9, 2.2, 3.0, 2.4, 1.6]) * k, 0.55 * min_feature)
        xb = max(0.13 * a, r[1] + 0.9)
        pts = np.array(
            [
                [xb * 0.95, 0.50 * b, 0.06 * c],  # frontal horn tip
                [xb, 0.28 * b, 0.2 * c],  # frontal horn / body
                [xb * 1.05, -0.10 * b, 0.22 * c],  # body
                [0.3 * a, -0.42 * b, 0.08 * c],  # atrium
                [0.22 * a, -0.66 * b, 0.02 * c],  # occipital horn tip
            ]
        )
        temporal = np.array([pts[3], [0.40 * a, -0.30 * b, -0.20 * c], [0.46 * a, -0.05 * b, -0.42 * c]])
        pts[:, 0] *= s
        temporal[:, 0] *= s
        out.append((pts, r[:5]))
        out.append((temporal, np.array([r[3], r[6], r[7]])))
    return tuple(out)


def _deep_grey(rng: np.random.Generator, *, a: float, b: float, c: float) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Paired thalami (medial, posterior) and basal ganglia (lateral, anterior) as ellipsoids."""
    parts = []
    for s in (-1.0, 1.0):
        k = rng.uniform(0.92, 1.08)
        # thalamus (medial, posterior), lentiform nucleus (lateral), caudate head (beside the frontal horn); the
        # gaps between them are the internal capsule (white matter)
        parts.append((np.array([s * 0.14 * a, -0.13 * b, -0.07 * c]), np.array([0.13 * a, 0.27 * b, 0.3 * c]) * k))
        parts.append((np.array([s * 0.38 * a, 0.10 * b, -0.07 * c]), np.array([0.1 * a, 0.3 * b, 0.3 * c]) * k))
        parts.append((np.array([s * 0.24 * a, 0.32 * b, 0.10 * c]), np.array([0.07 * a, 0.11 * b, 0.11 * c]) * k))
    return tuple(parts)


# ----------------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------------


def _skull_depth(c: Coords, anat: _Anatomy) -> np.ndarray:
    """Inner skull boundary: cerebral egg, posterior fossa and the canal of the brainstem."""
    d = _egg(c, anat.skull6, anat.taper)
    csf_pf = float(anat.skull6[0] - anat.brain6[0]) + 1.0
    np.maximum(d, _small_ellipsoid(c, anat.pf_center, anat.pf_semi + csf_pf), out=d)
    np.maximum(d, _tube(c, anat.stem_pts[1:], anat.stem_r[1:] + csf_pf), out=d)
    return d


def _sulcal_depth(c: Coords, d_smooth: np.ndarray, anat: _Anatomy) -> np.ndarray:
    """Depth from the nearest sulcal CSF sheet (mm, < 0 inside the sulcus); +inf where there is none."""
    r = np.sqrt(c[0] ** 2 + c[1] ** 2 + c[2] ** 2) + _F32(1e-3)
    n = (c[0] / r, c[1] / r, c[2] / r)
    out = np.full(r.shape, np.inf, dtype=_F32)
    for lev in anat.sulci:
        f, gt = lev.waves.value_and_tangent_grad(n)
        gate = np.clip((lev.gate.value(n) + 0.4) / 0.8, 0.0, 1.0)
        depth = _F32(lev.depth_mm) * gate
        lat = np.abs(f) * r / (gt + _F32(1e-3))
        _sheet_min(out, lat, d_smooth, depth, lev.gap_mm)
    depth_syl, gap_syl, z0, slope = anat.sylvian
    side = np.clip((np.abs(n[0]) - 0.35) / 0.2, 0.0, 1.0) * np.clip(1.0 - np.abs(n[1] + 0.1) / 0.5, 0.0, 1.0)
    f = n[2] - (z0 + slope * n[1])
    gx, gy, gz = np.zeros_like(f), np.full_like(f, -slope), np.ones_like(f)
    radial = gy * n[1] + gz * n[2]
    gt = np.sqrt((gx - radial * n[0]) ** 2 + (gy - radial * n[1]) ** 2 + (gz - radial * n[2]) ** 2)
    _sheet_min(out, np.abs(f) * r / (gt + _F32(1e-3)), d_smooth, _F32(depth_syl) * side, gap_syl)
    return out


def _sheet_min(
    out: np.ndarray, lat: np.ndarray, d_smooth: np.ndarray, depth: np.ndarray, gap: float, opening: float = 1.2
) -> None:
    """Fold a sulcal sheet (lateral distance ``lat``, reaching ``depth`` below the pial surface) into ``out``.

    The CSF gap widens by ``opening`` mm towards the surface so gyri get rounded crowns, as on real T2 images.
    """
    below = np.maximum(d_smooth - depth, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        near_surface = np.clip(1.0 - d_smooth / np.maximum(depth, _F32(1e-3)), 0.0, 1.0)
    half = _F32(gap / 2) + _F32(opening / 2) * near_surface * near_surface
    dist = np.sqrt(lat * lat + below * below) - half
    dist = np.where(depth > 0.05, dist, np.inf)
    np.minimum(out, dist, out=out)


def _label_points(c: Coords, anat: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """FeTA labels and a within-tissue intensity modulation for points inside the skull (brain frame, mm)."""
    L = label_ids()
    x, y, z = c
    lab = np.full(x.shape, L["external_csf"], dtype=np.uint8)
    mod = np.ones(x.shape, dtype=_F32)

    r = np.sqrt(x * x + y * y + z * z) + _F32(1e-3)
    d_smooth = _egg(c, anat.brain6, anat.taper) + _F32(anat.shape_amp) * anat.shape_waves.value((x / r, y / r, z / r))
    d_pf = _small_ellipsoid(c, anat.pf_center, anat.pf_semi, margin=anat.cortex_mm + 8.0)  # cortex lines the tentorium
    d_stem_low = _tube(c, anat.stem_pts[2:], anat.stem_r[2:])
    excl = np.maximum(d_pf + _F32(1.2), d_stem_low + _F32(1.5))
    half_w = _F32(anat.fissure_mm / 2)
    z_cc = _F32(anat.cc_top) - _F32(3.0) * np.maximum(np.abs(y - _F32(anat.cc_y)) - _F32(anat.cc_half), 0.0)
    d_fiss = np.maximum(np.abs(x) - half_w, z_cc - z)
    region = np.minimum(np.minimum(d_smooth, -excl), d_fiss)
    d_wall = np.where(z > z_cc, np.abs(x) - half_w, np.inf).astype(_F32)
    d_ctx = np.minimum(np.minimum(d_smooth, -excl), d_wall)

    band = np.flatnonzero((region > 0) & (d_smooth < _F32(anat.cortex_mm + 16.0)))
    if band.size:
        sub = (x[band], y[band], z[band])
        d_ctx[band] = np.minimum(d_ctx[band], _sulcal_depth(sub, d_smooth[band], anat))

    cerebrum = (region > 0) & (d_ctx > 0)
    gm = cerebrum & (d_ctx < _F32(anat.cortex_mm))
    wm = cerebrum & ~gm
    lab[gm] = L["grey_matter"]
    lab[wm] = L["white_matter"]
    # subplate / intermediate zone: WM just below the cortex is brighter, more so in young fetuses
    mod[wm] = 1.0 + anat.subplate * np.exp(-(d_ctx[wm] - anat.cortex_mm) / 3.0)

    lab[_tube(c, anat.stem_pts, anat.stem_r) > 0] = L["brainstem"]
    d_cb = np.max(np.stack([_small_ellipsoid(c, p, s) for p, s in anat.cb_parts]), axis=0)
    cb = d_cb > 0
    lab[cb] = L["cerebellum"]
    # folia: a fan of fissures radiating from the fourth ventricle in the sagittal plane
    fan = np.arctan2(z[cb] - _F32(anat.pf_center[2]), y[cb] - _F32(anat.pf_center[1]) - _F32(2.0))
    mod[cb] = 1.0 + 0.07 * np.cos(fan * _F32(11.0)) * np.clip(d_cb[cb] / 2.0, 0.0, 1.0)

    d_dgm = np.max(np.stack([_small_ellipsoid(c, p, s) for p, s in anat.dgm]), axis=0)
    lab[(d_dgm > 0) & (cerebrum | (lab == L["brainstem"]))] = L["deep_grey_matter"]

    d_v = _small_ellipsoid(c, *anat.third_v)
    for pts, radii in anat.lv:
        np.maximum(d_v, _tube(c, pts, radii, stretch=(0.85, 1.0, 1.5)), out=d_v)
    lab[d_v > 0] = L["ventricles"]
    return lab, mod


# ----------------------------------------------------------------------------------------------------------------
# Grid, orientation and image formation
# ----------------------------------------------------------------------------------------------------------------


def _orientation_transform(axcodes: str) -> np.ndarray:
    """nibabel orientation transform from canonical RAS arrays to the requested on-disk axcodes."""
    _check_axcodes(axcodes)
    return nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.axcodes2ornt(tuple(axcodes)))


def _canonical_grid(
    shape: tuple[int, int, int], profile: SiteProfile, fov_mm: float
) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """Shape and spacing of the RAS working grid such that, once reoriented, the arrays have ``shape``."""
    xform = _orientation_transform(profile.orientation)
    disk_spacing = np.array([fov_mm / s for s in shape]) * profile.spacing_scale
    canon_shape = tuple(int(shape[int(xform[i, 0])]) for i in range(3))
    canon_spacing = np.array([disk_spacing[int(xform[i, 0])] for i in range(3)])
    return canon_shape, canon_spacing, xform  # type: ignore[return-value]


def _world_to_brain(
    canon_shape: tuple[int, int, int], spacing: np.ndarray, rot: np.ndarray, offset: np.ndarray
) -> Coords:
    """Brain-frame coordinates (mm) of every voxel centre of the RAS grid (grid centre = world origin)."""
    axes = [
        ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * sp - off)
        for n, sp, off in zip(canon_shape, spacing, offset)
    ]
    wx, wy, wz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    # brain = R^T (world - offset): row j of R^T is column j of R
    return tuple(  # type: ignore[return-value]
        (_F32(rot[0, j]) * wx.astype(_F32) + _F32(rot[1, j]) * wy.astype(_F32) + _F32(rot[2, j]) * wz.astype(_F32))
        for j in range(3)
    )


def _pose(anat: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Small random head rotation and offset (FeTA volumes are only roughly aligned to a standard plane)."""
    angles = np.clip(rng.normal(0.0, 3.0, 3), -6.0, 6.0)
    rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    lift = 0.1 * float(anat.skull6[4])  # room below the cerebrum for the posterior fossa
    offset = rng.uniform(-3.0, 3.0, 3) + np.array([0.0, 0.0, lift])
    return rot, offset


def _rasterize(
    canon_shape: tuple[int, int, int], spacing: np.ndarray, anat: _Anatomy, rot: np.ndarray, offset: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label, intensity modulation and skull depth sampled at the voxel centres of a RAS grid."""
    c = _world_to_brain(canon_shape, spacing, rot, offset)
    d_skull = _skull_depth(c, anat)
    label = np.zeros(canon_shape, dtype=np.uint8)
    mod = np.ones(canon_shape, dtype=_F32)
    inside = np.flatnonzero(d_skull > 0)
    pts = tuple(ci.reshape(-1)[inside] for ci in c)
    del c
    lab_in, mod_in = _label_points(pts, anat)  # type: ignore[arg-type]
    label.reshape(-1)[inside] = lab_in
    mod.reshape(-1)[inside] = mod_in
    return label, mod, d_skull


def _supersampling(spacing: np.ndarray) -> int:
    """Sub-voxels per axis for the image: partial volume matters once voxels are coarser than ~1.5 mm."""
    return int(np.clip(round(float(spacing.max()) / 1.0), 1, 3))


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    n = [s // factor for s in img.shape]
    return img.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5), dtype=_F32)


def _smooth_noise(shape: tuple[int, ...], spacing: np.ndarray, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=_F32)
    out = ndimage.gaussian_filter(noise, sigma=[sigma_mm / s for s in spacing], mode="nearest")
    return out / _F32(max(float(out.std()), 1e-6))


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * f), f in [-1, 1] built from a few low-frequency separable waves."""
    field_ = np.zeros(shape, dtype=_F32)
    for _ in range(3):
        term = np.ones((1, 1, 1), dtype=_F32)
        for ax, n in enumerate(shape):
            t = np.linspace(-0.5, 0.5, n, dtype=_F32)
            wave = np.cos(_F32(2 * np.pi * rng.uniform(0.3, 1.0)) * t + _F32(rng.uniform(0, 2 * np.pi)))
            term = term * wave.reshape([-1 if i == ax else 1 for i in range(3)])
        field_ += term * _F32(rng.uniform(0.5, 1.0))
    field_ /= _F32(max(float(np.abs(field_).max()), 1e-6))
    return np.exp(_F32(strength) * field_)


def _tissue_image(
    label: np.ndarray,
    mod: np.ndarray,
    d_skull: np.ndarray,
    spacing: np.ndarray,
    profile: SiteProfile,
    rng: np.random.Generator,
) -> np.ndarray:
    """The object being imaged: T2 contrast per tissue, maternal tissue band, modulation and texture."""
    names = {v: k for k, v in label_ids().items()}
    lut = np.zeros(max(names) + 1, dtype=_F32)
    for value, name in names.items():
        lut[value] = profile.tissue_t2.get(name, 0.0)
    img = lut[label]
    if profile.surround_t2 > 0:
        band = (d_skull <= 0) & (d_skull > -profile.surround_mm)
        skull_bone = (d_skull <= 0) & (d_skull > -1.5)
        img[band] = profile.surround_t2
        img[skull_bone] = 0.25 * profile.surround_t2
    img *= mod
    if profile.texture > 0:
        img *= 1.0 + _F32(profile.texture) * _smooth_noise(label.shape, spacing, rng, 1.2)
    return img


def _acquire(img: np.ndarray, spacing: np.ndarray, profile: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """What the site's reconstruction does to it: PSF blur -> bias -> gamma -> Rician noise -> scanner scale."""
    sigma = [fwhm * FWHM_TO_SIGMA / sp for fwhm, sp in zip(profile.psf_fwhm_mm, spacing)]
    if max(sigma) > 0.05:
        img = ndimage.gaussian_filter(img, sigma=sigma, mode="constant", cval=0.0)
    if profile.bias_strength > 0:
        img *= _bias_field(img.shape, rng, profile.bias_strength)
    np.clip(img, 0.0, None, out=img)
    img /= _F32(max(float(img.max()), 1e-6))
    if profile.gamma != 1.0:
        np.power(img, _F32(profile.gamma), out=img)
    if profile.noise_sigma > 0:
        s = _F32(profile.noise_sigma)
        n1 = rng.standard_normal(img.shape, dtype=_F32)
        n1 *= s
        n1 += img
        n2 = rng.standard_normal(img.shape, dtype=_F32)
        n2 *= s
        img = np.sqrt(n1 * n1 + n2 * n2)
    img *= _F32(profile.intensity_scale)
    return img.astype(_F32, copy=False)


def generate_phantom(
    *, shape: tuple[int, int, int], ga_weeks: float, profile: SiteProfile, seed: int, fov_mm: float = 128.0
) -> Phantom:
    """One synthetic T2w case with FeTA labels, as acquired and reconstructed at ``profile``'s site.

    ``shape`` is the on-disk array shape; the voxel size is ``fov_mm / shape * profile.spacing_scale``. Same
    arguments -> identical arrays.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    if not GA_MIN <= ga_weeks <= GA_MAX:
        raise ValueError(f"ga_weeks must be within {GA_MIN}..{GA_MAX}, got {ga_weeks}")
    rng = np.random.default_rng(int(seed))
    disk_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    canon_shape, spacing, xform = _canonical_grid(disk_shape, profile, float(fov_mm))
    anat = _sample_anatomy(float(ga_weeks), rng, min_feature=float(spacing.max()))
    rot, offset = _pose(anat, rng)
    # labels: voxel centres; image: sub-voxel samples averaged, so coarse voxels carry partial volume
    label = _rasterize(canon_shape, spacing, anat, rot, offset)[0]
    _warn_if_cropped(label, ga_weeks)
    f = _supersampling(spacing)
    fine_shape = (canon_shape[0] * f, canon_shape[1] * f, canon_shape[2] * f)
    fine = _rasterize(fine_shape, spacing / f, anat, rot, offset)
    obj = _block_mean(_tissue_image(*fine, spacing / f, profile, rng), f)
    del fine
    image = _acquire(obj, spacing, profile, rng)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(canon_shape) - 1) / 2.0 * spacing
    image = np.ascontiguousarray(nio.apply_orientation(image, xform), dtype=_F32)
    label = np.ascontiguousarray(nio.apply_orientation(label, xform), dtype=np.uint8)
    affine = affine @ nio.inv_ornt_aff(xform, canon_shape)
    return Phantom(image=image, label=label, affine=affine, ga_weeks=float(ga_weeks))


def _warn_if_cropped(label: np.ndarray, ga_weeks: float) -> None:
    """A head cut by the field of view is not a valid FeTA-like case: say so (fov_mm or spacing_scale too small)."""
    faces = (label[0], label[-1], label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1])
    if any(face.any() for face in faces):
        log.warning("phantom head at GA %.1f touches the edge of the field of view; increase fov_mm", ga_weeks)
