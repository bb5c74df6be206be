"""The FeTA label set, read from the bundle's ``metadata.json`` (the only place it is written down).

Everything that needs a label value, a name or a colour (generator, metrics, reports, MONAI Label ``/info/``, the
Slicer client via the server) asks this module instead of typing the table again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from fetalseg.paths import bundle_dir


class Code(NamedTuple):
    """A coded concept (DICOM: CodingSchemeDesignator, CodeValue, CodeMeaning), e.g. a SNOMED CT anatomy code."""

    scheme: str
    value: str
    meaning: str

    def as_dicom(self) -> dict[str, str]:
        return {"CodeValue": self.value, "CodingSchemeDesignator": self.scheme, "CodeMeaning": self.meaning}


@dataclass(frozen=True)
class Label:
    """One label value of the segmentation."""

    value: int
    name: str  # machine name, e.g. "white_matter"
    color: tuple[int, int, int]  # RGB 0..255
    category_code: Code | None = None  # DICOM SEG segmented property category (metadata.json "label_codes")
    type_code: Code | None = None  # DICOM SEG segmented property type: the tissue's anatomic code

    @property
    def display_name(self) -> str:
        """Human name, e.g. "External CSF", "White matter"."""
        words = self.name.replace("_", " ").split()
        words = [w.upper() if w in {"csf"} else w for w in words]
        text = " ".join(words)
        return text[:1].upper() + text[1:]


@lru_cache(maxsize=8)
def _load(root: Path) -> tuple[Label, ...]:
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    colors = meta.get("label_colors", {})
    codes = meta.get("label_codes", {})
    labels = []
    for key in sorted(channel_def, key=int):
        rgb = tuple(int(c) for c in colors.get(key, (128, 128, 128)))
        coded = {
            f"{k}_code": Code(*(str(v) for v in codes[key][k])) for k in ("category", "type") if k in codes.get(key, {})
        }
        labels.append(Label(value=int(key), name=str(channel_def[key]), color=rgb, **coded))  # type: ignore[arg-type]
    values = [lab.value for lab in labels]
    if values != list(range(len(values))):
        raise ValueError(f"bundle labels must be 0..N-1 without gaps, got {values}")
    return tuple(labels)


def all_labels(root: Path | None = None) -> tuple[Label, ...]:
    """All labels including background (value 0), in value order."""
    return _load((root or bundle_dir()).resolve())


def foreground_labels(root: Path | None = None) -> tuple[Label, ...]:
    """The tissue labels (everything but background)."""
    return all_labels(root)[1:]


def num_classes(root: Path | None = None) -> int:
    """Number of output channels (labels incl. background)."""
    return len(all_labels(root))


def max_label(root: Path | None = None) -> int:
    """Largest valid label value."""
    return num_classes(root) - 1


def label_ids(root: Path | None = None) -> dict[str, int]:
    """Map machine name -> value, e.g. ``{"background": 0, "external_csf": 1, ...}``."""
    return {lab.name: lab.value for lab in all_labels(root)}


def label_names(root: Path | None = None) -> dict[int, str]:
    """Map value -> machine name."""
    return {lab.value: lab.name for lab in all_labels(root)}
