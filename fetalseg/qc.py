"""Gestational-age-aware quality control of a segmentation: tissue volumes (ml) against published growth curves.

Why: a segmentation can look plausible slice by slice and still hold a cerebellum the size of a 20-week fetus in a
34-week case. Volumes are computed from the label map and its voxel size; each tissue with a published curve
(:mod:`fetalseg.growth`) is compared with the curve at the case's gestational age (GA) and flagged by the rule
stated there. GA comes from the caller (a request parameter), a DICOM series (Last Menstrual Date and the study
date), or the FeTA BIDS ``participants.tsv`` (read by :mod:`fetalseg.data.loaders`). A missing GA is not an error:
the volumes are still reported, with no flags and a sentence saying why. An absurd GA (not a number, outside
15-45 weeks) raises :class:`GestationalAgeError`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalseg.data.loaders import _participants_ga  # the FeTA BIDS participants.tsv reader (one definition)
from fetalseg.growth import BAND_Z, FLAG_RULE, FLAG_Z, MEASURES, Measure
from fetalseg.labels import all_labels

GA_MIN_WEEKS = 15.0
GA_MAX_WEEKS = 45.0
NO_GA = (
    "gestational age unknown (no ga_weeks parameter, no DICOM Last Menstrual Date, no participants.tsv entry): "
    "volumes reported, nothing compared or flagged"
)


class GestationalAgeError(ValueError):
    """A gestational age that is not a number of weeks within 15-45."""


def parse_ga(value: Any, *, source: str = "ga_weeks") -> float | None:
    """A GA in weeks from user input: None/'' -> None (unknown); non-numeric or outside 15-45 -> error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise GestationalAgeError(f"{source} must be a number of weeks, got {value!r}")
    try:
        ga = float(value)
    except (TypeError, ValueError) as exc:
        raise GestationalAgeError(f"{source} must be a number of weeks, got {value!r}") from exc
    if not math.isfinite(ga) or not GA_MIN_WEEKS <= ga <= GA_MAX_WEEKS:
        raise GestationalAgeError(
            f"{source} = {value!r} is not a plausible gestational age "
            f"(expected {GA_MIN_WEEKS:g}-{GA_MAX_WEEKS:g} weeks)"
        )
    return ga


def _dicom_date(value: Any) -> dt.date | None:
    text = str(value or "").strip()[:8]
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def ga_from_dicom(folder: str | Path) -> float | None:
    """GA in weeks from a DICOM series folder: (study date - Last Menstrual Date (0010,21D0)) / 7, else None.

    DICOM images carry no GA attribute of their own; the Patient Study module's Last Menstrual Date with the
    Study (or Series / Acquisition) Date is the standard way to derive it. The result is checked like user input.
    """
    import pydicom

    folder = Path(folder)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not a DICOM file: try the next one
            continue
        lmp = _dicom_date(ds.get("LastMenstrualDate"))
        scan = next(
            (d for d in (_dicom_date(ds.get(k)) for k in ("StudyDate", "SeriesDate", "AcquisitionDate")) if d), None
        )
        if lmp is None or scan is None:
            return None
        return parse_ga(round((scan - lmp).days / 7.0, 2), source="DICOM Last Menstrual Date -> study date")
    return None


def ga_from_participants(folder: str | Path, image_stem: str) -> float | None:
    """GA of the participant whose id is ``image_stem`` or its ``sub-XXX`` prefix, from ``folder/participants.tsv``."""
    ages = _participants_ga(Path(folder))
    for pid, ga in ages.items():
        if pid and (image_stem == pid or image_stem.startswith(pid + "_")):
            return parse_ga(ga, source=f"participants.tsv GA of {pid}")
    return None


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml (|det| of the affine's 3x3 part, mm³, / 1000)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def tissue_volumes_ml(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume (ml) of each FeTA tissue (labels 1..7, by name) in a label map on ``affine``'s grid."""
    label = np.asarray(label)
    if label.dtype.kind != "u":  # bincount takes unsigned labels as they are; others are checked and cast
        if label.size and label.min() < 0:
            raise ValueError("label values must be 0..7")
        label = label.astype(np.intp)
    counts = np.bincount(label.ravel(), minlength=8)
    voxel = voxel_volume_ml(affine)
    return {lab.name: float(counts[lab.value]) * voxel for lab in all_labels() if lab.value > 0}


@dataclass(frozen=True)
class MeasureCheck:
    """One measure's volume (a tissue, or a sum of tissues) and, where the publication covers the GA, its z."""

    measure: str
    display_name: str
    labels: tuple[int, ...]
    volume_ml: float
    status: str  # "ok", "low", "high", "no reference", "outside reference GA range", "no GA"
    mean_ml: float | None = None
    sd_ml: float | None = None
    z: float | None = None
    source: Mapping[str, Any] | None = None
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.status in ("low", "high")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tissue": self.measure,
            "display_name": self.display_name,
            "labels": list(self.labels),
            "volume_ml": round(self.volume_ml, 3),
            "status": self.status,
            "flagged": self.flagged,
        }
        if self.mean_ml is not None and self.sd_ml is not None and self.z is not None:
            out.update(
                expected_ml=self.mean_ml,
                sd_ml=self.sd_ml,
                z=round(self.z, 2),
                low_ml=round(max(0.0, self.mean_ml - FLAG_Z * self.sd_ml), 3),
                high_ml=round(self.mean_ml + FLAG_Z * self.sd_ml, 3),
                band95_ml=[
                    round(max(0.0, self.mean_ml - BAND_Z * self.sd_ml), 3),
                    round(self.mean_ml + BAND_Z * self.sd_ml, 3),
                ],
            )
        if self.source is not None:
            out["source"] = dict(self.source)
        if self.note:
            out["note"] = self.note
        return out


def check_measure(m: Measure, volume_ml: float, ga_weeks: float | None) -> MeasureCheck:
    """Where ``volume_ml`` of measure ``m`` falls for ``ga_weeks`` (see :data:`fetalseg.growth.FLAG_RULE`)."""
    base = (m.name, m.display_name, m.labels, volume_ml)
    ref = m.reference
    if ref is None:
        return MeasureCheck(*base, "no reference", note=m.no_reference)
    if ga_weeks is None:
        return MeasureCheck(*base, "no GA", source=ref.source())
    if not ref.covers(ga_weeks):
        note = f"published for completed weeks {ref.first_week}-{ref.last_week}; GA {ga_weeks:g} is outside them"
        return MeasureCheck(*base, "outside reference GA range", source=ref.source(), note=note)
    mean, sd = ref.mean_sd(ga_weeks)
    z = (volume_ml - mean) / sd
    status = "low" if z < -FLAG_Z else "high" if z > FLAG_Z else "ok"
    return MeasureCheck(*base, status, mean, sd, z, ref.source(), ref.note)


def assess(volumes_ml: Mapping[str, float], ga_weeks: float | None, *, ga_source: str | None = None) -> dict[str, Any]:
    """The QC report (JSON-ready) of one segmentation's tissue volumes (by FeTA tissue name) at ``ga_weeks``."""
    by_value = {lab.value: float(volumes_ml.get(lab.name, 0.0)) for lab in all_labels() if lab.value > 0}
    checks = [check_measure(m, sum(by_value[v] for v in m.labels), ga_weeks) for m in MEASURES]
    flags = [
        f"{c.display_name} {c.volume_ml:.2f} ml is {'below' if c.status == 'low' else 'above'} the normal range for "
        f"{ga_weeks:g} weeks (published mean {c.mean_ml:.2f} ± {c.sd_ml:.2f} ml, z = {c.z:+.1f})"
        for c in checks
        if c.flagged
    ]
    report: dict[str, Any] = {
        "ga_weeks": ga_weeks,
        "ga_source": ga_source,
        "status": "checked" if ga_weeks is not None else "no GA",
        "flagged": bool(flags),
        "flags": flags,
        "rule": FLAG_RULE,
        "volumes_ml": {lab.name: round(by_value[lab.value], 3) for lab in all_labels() if lab.value > 0},
        "tissues": [c.to_json() for c in checks],
    }
    if ga_weeks is None:
        report["message"] = NO_GA
    return report


def assess_label(
    label: np.ndarray, affine: np.ndarray, ga_weeks: float | None, *, ga_source: str | None = None
) -> dict[str, Any]:
    """:func:`assess` of a label map's tissue volumes."""
    return assess(tissue_volumes_ml(label, affine), ga_weeks, ga_source=ga_source)


def typical_volumes_ml(ga_weeks: float, *, white_fraction: float = 0.85) -> dict[str, float]:
    """Per-tissue volumes at the published weekly means (for building test and demo cases with known volumes).

    White and deep grey matter are published only as their sum (SBV); ``white_fraction`` splits it (our choice)."""
    out = {}
    for m in MEASURES[:7]:
        if m.reference is not None:
            out[m.name] = m.reference.mean_sd(ga_weeks)[0]
    sbv = next(m for m in MEASURES if m.name == "subcortical").reference.mean_sd(ga_weeks)[0]  # type: ignore[union-attr]
    out["white_matter"] = sbv * white_fraction
    out["deep_grey_matter"] = sbv * (1.0 - white_fraction)
    return out


def label_with_volumes(volumes_ml: Mapping[str, float], shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """A label map on ``shape``/``affine`` holding each tissue's volume (to the voxel): tissues are laid out one after
    another in voxel order. For tests that place cases inside or outside the published range on purpose."""
    voxel = voxel_volume_ml(affine)
    label = np.zeros(tuple(shape), np.uint8)
    flat = label.reshape(-1)
    start = 0
    for lab in all_labels():
        n = round(float(volumes_ml.get(lab.name, 0.0)) / voxel) if lab.value > 0 else 0
        if start + n > flat.size:
            raise ValueError(f"{sum(volumes_ml.values()):.1f} ml do not fit in {flat.size} voxels of {voxel:g} ml")
        flat[start : start + n] = lab.value
        start += n
    return label


@dataclass(frozen=True)
class CasePoint:
    """One case on the growth chart: its GA (None: not drawn) and tissue volumes."""

    case_id: str
    ga_weeks: float | None
    volumes_ml: Mapping[str, float]


def plot_growth(points: Sequence[CasePoint], path: str | Path, *, title: str = "") -> Path:
    """Volume vs GA per measure: the published weekly mean, its ±1.96 SD range and the |z| ≤ 3 range where a
    reference exists, each case a point (red when flagged). Measures without one say "no reference". PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dated = [p for p in points if p.ga_weeks is not None]
    ga_values = [float(p.ga_weeks) for p in dated]  # type: ignore[arg-type]
    ga_lo, ga_hi = min([18.0, *ga_values]), max([38.0, *ga_values])
    fig, axes = plt.subplots(3, 4, figsize=(17, 11), constrained_layout=True)
    for ax, m in zip(axes.ravel(), MEASURES, strict=False):
        ref = m.reference
        if ref is not None:
            weeks = np.arange(ref.first_week, ref.last_week + 2)  # a row holds for its whole completed week
            mean = np.array([r[0] for r in ref.rows] + [ref.rows[-1][0]])
            sd = np.array([r[1] for r in ref.rows] + [ref.rows[-1][1]])
            flag_lo = np.maximum(mean - FLAG_Z * sd, 0)
            ax.fill_between(weeks, flag_lo, mean + FLAG_Z * sd, step="post", color="0.9", label=f"|z| ≤ {FLAG_Z:g}")
            band_lo = np.maximum(mean - BAND_Z * sd, 0)
            ax.fill_between(weeks, band_lo, mean + BAND_Z * sd, step="post", color="0.75", label="mean ± 1.96 SD")
            ax.step(weeks, mean, where="post", color="0.2", label=f"published mean ({ref.key})")
            ax.text(0.02, 0.98, ref.short, transform=ax.transAxes, va="top", fontsize=7)
        else:
            ax.text(0.02, 0.98, "no reference", transform=ax.transAxes, va="top", fontsize=8, color="0.4")
        ys = [sum(float(p.volumes_ml.get(n, 0.0)) for n in _names(m.labels)) for p in dated]
        colors = [
            "tab:red" if check_measure(m, y, x).flagged else "tab:blue" for x, y in zip(ga_values, ys, strict=True)
        ]
        ax.scatter(ga_values, ys, c=colors, s=18, zorder=3, label="cases")
        ax.set_title(m.display_name)
        ax.set_xlabel("gestational age (weeks)")
        ax.set_ylabel("volume (ml)")
        ax.set_xlim(ga_lo - 0.5, ga_hi + 0.5)
        if ref is not None:
            ax.legend(fontsize=6, loc="lower right")
    for ax in axes.ravel()[len(MEASURES) :]:
        ax.axis("off")
    undated = len(points) - len(dated)
    axes.ravel()[-1].text(
        0.0,
        0.95,
        f"{len(dated)} case(s) drawn" + (f", {undated} without GA not drawn" if undated else "") + "\n\n"
        f"Reference: Ren et al. 2022, Front Neurosci\n16:886083, Table 1 (weekly mean, SD).\n"
        f"Flag: |z| > {FLAG_Z:g} for the completed week. Red: flagged.\nSee docs/quality_control.md.",
        va="top",
        fontsize=9,
    )
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _names(values: Sequence[int]) -> list[str]:
    names = {lab.value: lab.name for lab in all_labels()}
    return [names[v] for v in values]
