"""The server's gestational-age-aware volume check, as the module shows it next to the case.

The server computes the tissue volumes and compares them with the published growth curve (``params.qc`` of
``/infer`` and of a label upload); this module only reads that report and words it for the radiologist. Nothing
here knows a curve or a threshold: those live once, on the server (the project's core).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TissueVolume:
    display_name: str
    volume_ml: float
    status: str  # "ok", "low", "high", "no reference", "outside reference GA range", "no GA"
    expected_ml: float | None = None
    low_ml: float | None = None
    high_ml: float | None = None
    source: str = ""
    z: float | None = None

    @property
    def flagged(self) -> bool:
        return self.status in ("low", "high")


@dataclass(frozen=True)
class QcReport:
    """Volumes, GA and flags of one segmentation, from the server's ``qc`` object."""

    ga_weeks: float | None
    ga_source: str | None
    flagged: bool
    flags: list[str] = field(default_factory=list)
    tissues: list[TissueVolume] = field(default_factory=list)
    message: str = ""
    rule: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> QcReport | None:
        """None when the server sent no check (an older server)."""
        if not isinstance(data, Mapping):
            return None
        tissues = []
        for t in data.get("tissues") or []:
            if not isinstance(t, Mapping):
                continue
            source = t.get("source") if isinstance(t.get("source"), Mapping) else {}
            tissues.append(
                TissueVolume(
                    str(t.get("display_name", t.get("tissue", "?"))),
                    float(t.get("volume_ml", 0.0)),
                    str(t.get("status", "")),
                    _num(t.get("expected_ml")),
                    _num(t.get("low_ml")),
                    _num(t.get("high_ml")),
                    str(source.get("short") or source.get("citation") or ""),
                    _num(t.get("z")),
                )
            )
        ga = _num(data.get("ga_weeks"))
        return cls(
            ga,
            data.get("ga_source") if isinstance(data.get("ga_source"), str) else None,
            bool(data.get("flagged")),
            [str(f) for f in data.get("flags") or []],
            tissues,
            str(data.get("message") or ""),
            str(data.get("rule") or ""),
        )

    def summary_text(self) -> str:
        """A few lines for the panel next to the case: GA, flags first, then every tissue's volume."""
        if self.ga_weeks is None:
            head = "Gestational age unknown: volumes shown, not compared with the normal range."
        else:
            head = f"Gestational age {self.ga_weeks:g} weeks (from {self.ga_source or 'unknown source'})."
        lines = [head]
        if self.flagged:
            lines.append("CHECK: " + " ".join(f"{f}." for f in self.flags))
        elif self.ga_weeks is not None:
            lines.append("No tissue with a published reference is outside its normal range.")
        for t in self.tissues:
            if t.flagged:
                verdict = "LOW" if t.status == "low" else "HIGH"
                z = f", z = {t.z:+.1f}" if t.z is not None else ""
                detail = f"{verdict}{z}, normal {t.low_ml:.2f}-{t.high_ml:.2f} ml"
            elif t.status == "ok":
                detail = f"normal range {t.low_ml:.2f}-{t.high_ml:.2f} ml"
            else:
                detail = t.status
            lines.append(f"  {t.display_name}: {t.volume_ml:.2f} ml ({detail})")
        return "\n".join(lines)


def _num(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
