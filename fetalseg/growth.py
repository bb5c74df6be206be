"""Published normative fetal brain volumes by gestational week, mapped to the FeTA tissues, with their sources.

Why a table and not a formula: the one source with a spread for (almost) every FeTA tissue publishes weekly means
and standard deviations, so the check compares a volume with the row of the case's completed gestational week.
Only numbers read in a retrievable source are here; where no published number maps to a FeTA tissue, the tissue
says ``no reference``. The synthetic phantom's growth model (:mod:`fetalseg.data.phantom`) is never a reference
(it would check the generator against itself).

Source
    Ren J-Y, Zhu M, Wang G, Gui Y, Jiang F, Dong S-Z. "Quantification of Intracranial Structures Volume in Fetuses
    Using 3-D Volumetric MRI: Normal Values at 19 to 37 Weeks' Gestation." Frontiers in Neuroscience 2022;16:886083,
    Table 1 (mean and SD per completed gestational week, 19-37). https://doi.org/10.3389/fnins.2022.886083 --
    188 fetuses with a normal brain appearance, 1.5 T, slice-to-volume reconstructions, manual segmentation.
    The numbers below were read in a public transcription of that table, not in the article itself (its full text
    could not be retrieved here): github.com/ajoshiusc/fetal-brain-growth, ``references/ren2022_weekly_mean_sd.csv``
    at commit ee8e0407656a99b99b5a35474367751552e519ee (MIT; described there as a manual, double-checked
    transcription with a script that compares it with the article's HTML). Check against Table 1 before clinical use.

Mapping FeTA label -> Ren et al. measure:

=====================  ==================================================  ======================================
FeTA (label)           Ren et al. 2022 measure                             note
=====================  ==================================================  ======================================
external CSF (1)       e-CSFV, extra-cerebrospinal fluid volume
grey matter (2)        GMV, cortical grey matter volume
white matter (3)       no reference of its own                             in SBV with deep grey matter
ventricles (4)         VV, lateral ventricles volume                       FeTA label 4 may hold more than the
                                                                           lateral ventricles: expect it larger
cerebellum (5)         CBV, cerebellum volume
deep grey matter (6)   no reference of its own                             in SBV with white matter
brainstem (7)          BM, brainstem volume                                boundaries may differ (spinal cord)
labels 3 + 6           SBV, subcortical brain tissue volume
labels 2+3+5+6+7       TBV, total brain volume
labels 1-7             ICV, intracranial cavity volume
=====================  ==================================================  ======================================

Flag rule: z = (volume - mean) / SD with the mean and SD of the case's completed gestational week; a measure is
flagged when |z| > 3 ("far outside"; the published mean ± 1.96 SD, the ~95 % range, is drawn too). GA outside the
published weeks (below 19 or from 38 weeks) is reported, not compared.

Cross-check (not used by the check): Liu F et al., Chinese Journal of Clinical Anatomy 2010;28(2):155
(https://chjcana.com/EN/abstract/abstract8431.shtml) fitted CV = 0.034·exp(GA/5.918) ml to 87 post-mortem fetal
cerebella: 3.86 ml at 28 weeks, against Ren et al.'s in-utero 5.63 ± 0.70 ml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fetalseg.labels import all_labels, label_ids

FLAG_Z = 3.0
BAND_Z = 1.96
FLAG_RULE = (
    f"flagged when |z| > {FLAG_Z:g}, z = (volume - published mean) / published SD of the case's completed "
    "gestational week (Ren et al. 2022, Table 1)"
)

_REN_CITATION = (
    "Ren J-Y, Zhu M, Wang G, Gui Y, Jiang F, Dong S-Z. Quantification of Intracranial Structures Volume in Fetuses "
    "Using 3-D Volumetric MRI: Normal Values at 19 to 37 Weeks' Gestation. Front Neurosci 2022;16:886083, Table 1"
)
_REN_URL = "https://doi.org/10.3389/fnins.2022.886083"
_REN_TRANSCRIPTION = (
    "read in github.com/ajoshiusc/fetal-brain-growth references/ren2022_weekly_mean_sd.csv "
    "@ ee8e0407656a99b99b5a35474367751552e519ee (a transcription of Table 1)"
)
REN_FIRST_WEEK = 19

# (mean ml, SD ml) per completed gestational week 19, 20, ..., 37, as in Ren et al. 2022 Table 1.
_REN_TABLE: dict[str, tuple[tuple[float, float], ...]] = {
    "TBV": ((29.33, 2.38), (37.63, 2.87), (47.28, 5.63), (56.08, 3.66), (64.98, 3.78), (74.98, 6.60), (83.17, 3.80),
            (91.10, 4.04), (122.30, 10.18), (140.80, 11.65), (164.10, 11.55), (175.60, 6.09), (182.00, 8.92),
            (197.80, 6.43), (212.10, 11.10), (236.90, 8.87), (260.30, 12.11), (294.00, 9.97), (316.90, 10.20)),
    "ICV": ((69.55, 3.05), (76.74, 2.13), (86.40, 5.65), (109.30, 11.90), (125.70, 9.34), (141.50, 12.11),
            (158.50, 9.53), (175.40, 9.45), (215.50, 21.33), (246.80, 15.27), (277.50, 13.94), (302.50, 15.51),
            (304.70, 12.19), (328.80, 9.25), (344.50, 10.24), (386.60, 12.09), (426.70, 23.28), (460.00, 9.74),
            (491.80, 11.47)),
    "GMV": ((6.57, 0.43), (7.28, 0.48), (9.99, 1.08), (12.05, 0.68), (13.63, 0.88), (15.42, 0.97), (16.96, 0.96),
            (18.47, 1.18), (24.31, 1.81), (29.98, 2.66), (33.44, 4.44), (39.71, 3.76), (40.95, 2.53), (45.78, 4.14),
            (47.84, 3.68), (58.23, 3.70), (65.24, 4.23), (77.26, 5.04), (83.96, 3.20)),
    "SBV": ((20.65, 1.98), (27.93, 2.30), (34.40, 5.11), (40.96, 2.68), (47.59, 3.72), (55.35, 5.97), (61.39, 3.93),
            (67.15, 3.62), (91.02, 9.20), (99.43, 12.54), (120.80, 11.43), (124.90, 6.29), (129.30, 7.60),
            (137.70, 8.89), (150.00, 9.27), (162.10, 7.39), (175.50, 7.95), (193.30, 8.88), (207.10, 10.27)),
    "e-CSFV": ((38.15, 1.07), (37.32, 1.09), (37.60, 5.85), (50.17, 11.28), (57.23, 7.42), (63.76, 12.21),
               (72.38, 11.33), (81.57, 8.24), (90.38, 21.36), (103.10, 10.13), (110.70, 20.53), (124.10, 18.73),
               (119.50, 11.20), (129.60, 10.68), (128.00, 16.53), (160.40, 16.00), (164.10, 17.51), (158.50, 13.08),
               (166.10, 15.17)),
    "VV": ((2.08, 0.53), (1.80, 0.77), (1.53, 0.43), (3.05, 0.79), (3.29, 0.84), (2.73, 0.93), (2.97, 0.82),
           (2.74, 0.86), (2.90, 0.92), (2.98, 0.89), (2.73, 0.85), (2.70, 0.72), (3.20, 0.95), (3.50, 1.22),
           (4.34, 1.24), (5.11, 1.42), (5.94, 1.64), (7.51, 0.64), (8.86, 0.61)),
    "CBV": ((1.32, 0.15), (1.54, 0.24), (1.85, 0.36), (1.84, 0.43), (2.41, 0.22), (2.64, 0.49), (3.15, 0.55),
            (3.58, 0.70), (4.50, 0.77), (5.63, 0.70), (6.75, 0.54), (7.54, 0.76), (8.32, 1.09), (10.43, 0.99),
            (10.49, 1.91), (12.71, 1.32), (15.14, 2.00), (17.76, 0.48), (18.83, 0.64)),
    "BM": ((0.79, 0.14), (0.87, 0.16), (1.05, 0.23), (1.23, 0.21), (1.36, 0.24), (1.57, 0.37), (1.67, 0.34),
           (1.90, 0.39), (2.42, 0.52), (3.14, 0.67), (3.09, 0.35), (3.49, 0.41), (3.54, 0.42), (3.79, 0.32),
           (3.83, 0.53), (3.87, 0.30), (4.89, 0.46), (5.70, 0.76), (7.07, 0.42)),
}  # fmt: skip


@dataclass(frozen=True)
class WeeklyReference:
    """Published mean and SD of one measure per completed gestational week."""

    key: str  # the publication's name of the measure, e.g. "CBV"
    structure: str  # what it measured
    rows: tuple[tuple[float, float], ...]  # (mean ml, SD ml) for weeks first_week, first_week + 1, ...
    first_week: int = REN_FIRST_WEEK
    citation: str = _REN_CITATION
    url: str = _REN_URL
    read_in: str = _REN_TRANSCRIPTION
    short: str = "Ren et al. 2022"
    note: str = ""

    @property
    def last_week(self) -> int:
        return self.first_week + len(self.rows) - 1

    def covers(self, ga_weeks: float) -> bool:
        return self.first_week <= math.floor(ga_weeks) <= self.last_week

    def mean_sd(self, ga_weeks: float) -> tuple[float, float]:
        """(mean, SD) in ml of the completed week ``floor(ga_weeks)``; ValueError outside the published weeks."""
        if not self.covers(ga_weeks):
            raise ValueError(f"{self.key}: published for weeks {self.first_week}-{self.last_week}, not {ga_weeks:g}")
        return self.rows[math.floor(ga_weeks) - self.first_week]

    def source(self) -> dict[str, object]:
        return {
            "measure": self.key,
            "structure": self.structure,
            "citation": self.citation,
            "url": self.url,
            "read_in": self.read_in,
            "short": self.short,
            "weeks": [self.first_week, self.last_week],
            "note": self.note,
        }


def _ren(key: str, structure: str, note: str = "") -> WeeklyReference:
    return WeeklyReference(key, structure, _REN_TABLE[key], note=note)


@dataclass(frozen=True)
class Measure:
    """A volume the check looks at: one FeTA tissue or a sum of them, and its published reference (or None)."""

    name: str
    display_name: str
    labels: tuple[int, ...]  # FeTA label values whose volumes are summed
    reference: WeeklyReference | None
    no_reference: str = ""  # why there is none


def _tissue(name: str, reference: WeeklyReference | None, no_reference: str = "") -> Measure:
    """A single FeTA tissue: value and display name from the bundle's labels (:mod:`fetalseg.labels`)."""
    lab = next(lab for lab in all_labels() if lab.name == name)
    return Measure(name, lab.display_name, (lab.value,), reference, no_reference)


def _sum(name: str, display_name: str, tissues: tuple[str, ...], reference: WeeklyReference) -> Measure:
    ids = label_ids()
    return Measure(name, display_name, tuple(ids[t] for t in tissues), reference)


_TISSUES = ("external_csf", "grey_matter", "white_matter", "ventricles", "cerebellum", "deep_grey_matter", "brainstem")
_IN_SBV = "published only together with the other (SBV): see 'White + deep grey matter'"

# The 7 FeTA tissues (in label order), then the sums Ren et al. report.
MEASURES: tuple[Measure, ...] = (
    _tissue("external_csf", _ren("e-CSFV", "extra-cerebrospinal fluid volume")),
    _tissue("grey_matter", _ren("GMV", "cortical grey matter volume")),
    _tissue("white_matter", None, _IN_SBV),
    _tissue(
        "ventricles",
        _ren("VV", "lateral ventricles volume", "FeTA's ventricles label may hold more than the lateral ventricles"),
    ),
    _tissue("cerebellum", _ren("CBV", "cerebellum volume")),
    _tissue("deep_grey_matter", None, _IN_SBV),
    _tissue("brainstem", _ren("BM", "brainstem volume", "boundaries (medulla, cord) may differ")),
    _sum(
        "subcortical",
        "White + deep grey matter",
        ("white_matter", "deep_grey_matter"),
        _ren("SBV", "subcortical brain tissue volume"),
    ),
    _sum(
        "total_brain",
        "Total brain",
        tuple(t for t in _TISSUES if t not in ("external_csf", "ventricles")),
        _ren("TBV", "total brain volume"),
    ),
    _sum("intracranial", "Intracranial", _TISSUES, _ren("ICV", "intracranial cavity volume")),
)


def measure(name: str) -> Measure:
    for m in MEASURES:
        if m.name == name:
            return m
    raise KeyError(f"no measure {name!r}; known: {[m.name for m in MEASURES]}")
