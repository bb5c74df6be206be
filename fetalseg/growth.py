"""Published normative growth curves of fetal brain tissue volumes, per FeTA tissue, with their sources.

Why this module is so short: only numbers read in a retrievable publication are here, and for six of the seven
FeTA tissues none could be retrieved while it was written (2026-12-03). Those tissues say ``no reference``; no
curve is made up for them, and the synthetic phantom's growth model (:mod:`fetalseg.data.phantom`) is never used
as a reference (it would check the generator against itself).

The one curve (cerebellum)
    Liu F, Li Z-P, Liu S-W, et al. "The development of fetal cerebellum assessed by MR images."
    Chinese Journal of Clinical Anatomy 2010; 28(2): 155. Abstract, Results:
    https://chjcana.com/EN/abstract/abstract8431.shtml
    "CV = 0.034 exp(FA/5.918)", cerebellar volume in cm³ (= ml) against fetal age FA in weeks, from 87 fetal
    specimens without CNS disease, 14-40 weeks, imaged post mortem at 3.0 T; "The doubling time of CV was about
    4.1 weeks". The abstract gives the median curve only, no spread.
    Cross-check, in utero (not used in the maths): Scott JA et al., Cerebellum 2012; 11(3): 761-770
    (https://pmc.ncbi.nlm.nih.gov/articles/PMC3389138) report a ~7-fold cerebellar volume increase from 20 to 31
    weeks; the curve above gives exp(11/5.918) = 6.4-fold.

Mapping FeTA tissue -> what a publication measured (``structure``); the studies we found whose numbers we could
not read are named so the gap can be closed from the papers themselves:

======================  =========================================  ================================================
FeTA tissue             published structure used                    status
======================  =========================================  ================================================
external CSF            —                                           no reference (Kyriakopoulou 2017 extra-cerebral
                                                                    CSF; Jarvis 2019 extra-axial volume)
grey matter             —                                           no reference (Kyriakopoulou 2017 cortex)
white matter            —                                           no reference
ventricles              —                                           no reference (Kyriakopoulou 2017 lateral
                                                                    ventricles; Jarvis 2019 ventricular volume)
cerebellum              cerebellum, Liu et al. 2010                 median curve, GA 14-40 weeks
deep grey matter        —                                           no reference
brainstem               —                                           no reference
======================  =========================================  ================================================

Flag rule (ours, not the paper's): with no published spread, a volume is flagged when it is below half or above
twice the published median for the case's gestational age, i.e. more than one doubling time (≈4.1 weeks of
growth, the source's own figure) away from the curve. The band drawn in plots is this rule, not a centile band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLAG_FACTOR = 2.0
FLAG_RULE = (
    f"flagged when the volume is below 1/{FLAG_FACTOR:g} or above {FLAG_FACTOR:g}× the published median for the "
    "gestational age (one doubling time ≈ 4.1 weeks of growth; the sources give no spread, so this band is the "
    "project's rule, not a published centile band)"
)


@dataclass(frozen=True)
class GrowthCurve:
    """A published median volume curve ``median_ml(ga)`` for one FeTA tissue, valid on ``ga_range`` (weeks)."""

    tissue: str  # FeTA label name (fetalseg.labels)
    structure: str  # what the publication measured
    citation: str
    url: str
    ga_range: tuple[float, float]
    a_ml: float  # median_ml(ga) = a_ml * exp(ga / tau_weeks)
    tau_weeks: float
    short: str = ""  # e.g. "Liu et al. 2010", for plot legends
    note: str = ""

    def median_ml(self, ga_weeks: float) -> float:
        return self.a_ml * math.exp(ga_weeks / self.tau_weeks)

    def band_ml(self, ga_weeks: float) -> tuple[float, float]:
        """(low, high) of the flag rule around the published median."""
        median = self.median_ml(ga_weeks)
        return median / FLAG_FACTOR, median * FLAG_FACTOR

    def covers(self, ga_weeks: float) -> bool:
        return self.ga_range[0] <= ga_weeks <= self.ga_range[1]

    def source(self) -> dict[str, object]:
        return {
            "structure": self.structure,
            "citation": self.citation,
            "short": self.short,
            "url": self.url,
            "ga_range_weeks": list(self.ga_range),
            "equation": f"median_ml = {self.a_ml:g} * exp(GA / {self.tau_weeks:g})",
            "note": self.note,
        }


LIU_2010_CEREBELLUM = GrowthCurve(
    tissue="cerebellum",
    structure="cerebellum (post-mortem fetal specimens, 3.0 T MRI)",
    citation="Liu F, Li Z-P, Liu S-W, et al. The development of fetal cerebellum assessed by MR images. "
    "Chinese Journal of Clinical Anatomy 2010;28(2):155 (abstract, Results)",
    url="https://chjcana.com/EN/abstract/abstract8431.shtml",
    ga_range=(14.0, 40.0),
    a_ml=0.034,
    tau_weeks=5.918,
    short="Liu et al. 2010 (post-mortem MRI)",
    note="median curve only (no spread published in the abstract); 'fetal age' of specimens, taken as GA in weeks; "
    "post-mortem volumes may differ from in-utero ones",
)

CURVES: dict[str, GrowthCurve] = {LIU_2010_CEREBELLUM.tissue: LIU_2010_CEREBELLUM}

# Tissues without a published curve in this module, and the publications that report a matching structure whose
# numbers (tables, equations) could not be retrieved here. Shown to users as "no reference".
NOT_RETRIEVED: dict[str, str] = {
    "external_csf": "Kyriakopoulou et al. 2017 (Brain Struct Funct 222:2295, extra-cerebral CSF); Jarvis et al. 2019 "
    "(Eur Radiol 29:3488, extra-axial volume): centile tables not retrieved",
    "grey_matter": "Kyriakopoulou et al. 2017 (cortex): centiles not retrieved",
    "white_matter": "no matching published curve retrieved",
    "ventricles": "Kyriakopoulou et al. 2017 (lateral ventricles); Jarvis et al. 2019 (ventricular volume): centile "
    "tables not retrieved",
    "deep_grey_matter": "no matching published curve retrieved",
    "brainstem": "no matching published curve retrieved",
}


def curve_for(tissue: str) -> GrowthCurve | None:
    """The published curve of a FeTA tissue (label name), or None: no reference."""
    return CURVES.get(tissue)
