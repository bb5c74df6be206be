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
from fetalseg.growth import FLAG_RULE, NOT_RETRIEVED, curve_for
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
    counts = np.bincount(np.asarray(label).astype(np.int64).ravel(), minlength=8)
    voxel = voxel_volume_ml(affine)
    return {lab.name: float(counts[lab.value]) * voxel for lab in all_labels() if lab.value > 0}


@dataclass(frozen=True)
class TissueCheck:
    """One tissue's volume and, where a published curve covers the GA, where it falls."""

    tissue: str
    display_name: str
    volume_ml: float
    status: str  # "ok", "low", "high", "no reference", "outside reference GA range", "no GA"
    expected_ml: float | None = None
    low_ml: float | None = None
    high_ml: float | None = None
    ratio: float | None = None
    source: Mapping[str, Any] | None = None
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.status in ("low", "high")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tissue": self.tissue,
            "display_name": self.display_name,
            "volume_ml": round(self.volume_ml, 3),
            "status": self.status,
            "flagged": self.flagged,
        }
        for key in ("expected_ml", "low_ml", "high_ml", "ratio"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3)
        if self.source is not None:
            out["source"] = dict(self.source)
        if self.note:
            out["note"] = self.note
        return out


def check_tissue(tissue: str, display_name: str, volume_ml: float, ga_weeks: float | None) -> TissueCheck:
    curve = curve_for(tissue)
    if curve is None:
        return TissueCheck(tissue, display_name, volume_ml, "no reference", note=NOT_RETRIEVED.get(tissue, ""))
    if ga_weeks is None:
        return TissueCheck(tissue, display_name, volume_ml, "no GA", source=curve.source())
    if not curve.covers(ga_weeks):
        lo, hi = curve.ga_range
        note = f"the published curve covers {lo:g}-{hi:g} weeks; GA {ga_weeks:g} is outside it"
        return TissueCheck(
            tissue, display_name, volume_ml, "outside reference GA range", source=curve.source(), note=note
        )
    expected = curve.median_ml(ga_weeks)
    low, high = curve.band_ml(ga_weeks)
    status = "low" if volume_ml < low else "high" if volume_ml > high else "ok"
    return TissueCheck(
        tissue, display_name, volume_ml, status, expected, low, high, volume_ml / expected, curve.source()
    )


def assess(volumes_ml: Mapping[str, float], ga_weeks: float | None, *, ga_source: str | None = None) -> dict[str, Any]:
    """The QC report (JSON-ready) of one segmentation's tissue volumes at ``ga_weeks`` (None: unknown)."""
    checks = [
        check_tissue(lab.name, lab.display_name, float(volumes_ml.get(lab.name, 0.0)), ga_weeks)
        for lab in all_labels()
        if lab.value > 0
    ]
    flags = [
        f"{c.display_name} {c.volume_ml:.2f} ml is {'below' if c.status == 'low' else 'above'} the normal range "
        f"{c.low_ml:.2f}-{c.high_ml:.2f} ml for {ga_weeks:g} weeks (published median {c.expected_ml:.2f} ml)"
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
        "volumes_ml": {c.tissue: round(c.volume_ml, 3) for c in checks},
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


@dataclass(frozen=True)
class CasePoint:
    """One case on the growth chart: its GA (None: not drawn) and tissue volumes."""

    case_id: str
    ga_weeks: float | None
    volumes_ml: Mapping[str, float]


def plot_growth(points: Sequence[CasePoint], path: str | Path, *, title: str = "") -> Path:
    """Volume vs GA per tissue: the published median and the flag band where a curve exists, each case a point
    (red when flagged). Tissues without a published curve show their points and say "no reference". PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tissues = [lab for lab in all_labels() if lab.value > 0]
    dated = [p for p in points if p.ga_weeks is not None]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), constrained_layout=True)
    ga_lo = min([GA_MIN_WEEKS + 5, *(p.ga_weeks for p in dated)])  # type: ignore[type-var]
    ga_hi = max([GA_MAX_WEEKS - 5, *(p.ga_weeks for p in dated)])  # type: ignore[type-var]
    for ax, lab in zip(axes.ravel(), tissues, strict=False):
        curve = curve_for(lab.name)
        if curve is not None:
            lo = max(curve.ga_range[0], ga_lo - 1)
            hi = min(curve.ga_range[1], ga_hi + 1)
            ga = np.linspace(lo, hi, 200)
            median = np.array([curve.median_ml(g) for g in ga])
            ax.fill_between(ga, median / 2, median * 2, color="0.85", label="normal range (flag rule)")
            ax.plot(ga, median, color="0.3", label="published median")
            ax.text(0.02, 0.98, curve.short, transform=ax.transAxes, va="top", fontsize=7)
        else:
            ax.text(0.02, 0.98, "no reference", transform=ax.transAxes, va="top", fontsize=8, color="0.4")
        xs = [p.ga_weeks for p in dated]
        ys = [float(p.volumes_ml.get(lab.name, 0.0)) for p in dated]
        colors = [
            "tab:red" if check_tissue(lab.name, lab.display_name, y, x).flagged else "tab:blue"
            for x, y in zip(xs, ys, strict=True)
        ]
        ax.scatter(xs, ys, c=colors, s=18, zorder=3, label="cases")
        ax.set_title(lab.display_name)
        ax.set_xlabel("gestational age (weeks)")
        ax.set_ylabel("volume (ml)")
        ax.set_xlim(ga_lo - 1, ga_hi + 1)
        if curve is not None:
            ax.legend(fontsize=7, loc="lower right")
    last = axes.ravel()[-1]
    last.axis("off")
    undated = len(points) - len(dated)
    last.text(
        0.0,
        0.9,
        f"{len(dated)} case(s) drawn" + (f", {undated} without GA not drawn" if undated else "") + "\n\n"
        "Flag rule: below ½ or above 2× the published\nmedian (no published spread available).\n"
        "Red: flagged. See docs/quality_control.md.",
        va="top",
        fontsize=9,
    )
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
