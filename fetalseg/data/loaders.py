"""Find cases in a dataset folder: the real FeTA BIDS layout, or a plain folder of image/label pairs.

Users point ``fetal-fl`` at their real data with no code change: :func:`load_dataset` recognises the layout.
Supported layouts (NIfTI ``.nii``/``.nii.gz`` and NRRD):

* FeTA BIDS: ``sub-XXX/anat/sub-XXX_rec-<method>_T2w.nii.gz`` + ``..._dseg.nii.gz``, ``participants.tsv`` with GA.
* ``images/`` + ``labels/`` (also ``imagesTr/`` + ``labelsTr/``), paired by file name.
* A flat folder: ``<name>.nii.gz`` + ``<name>_seg.nii.gz`` (or ``_dseg``, ``_label``, ``_labels``, ``_mask``).
* A MONAI Label datastore: ``<name>.nii.gz`` + ``labels/final/<name>.nii.gz``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fetalseg.data.io import IMAGE_SUFFIXES, LABEL_MARKERS, is_label_name, stem_of, suffix_of
from fetalseg.data.validation import DataValidationError, validate_cases

_BIDS_IMAGE = re.compile(
    r"^(sub-[A-Za-z0-9]+)(?:_ses-[A-Za-z0-9]+)?(?:_rec-([A-Za-z0-9]+))?(?:_[a-z]+-[A-Za-z0-9]+)*_T2w$"
)
GA_COLUMNS = ("Gestational age", "gestational_age", "GA", "ga", "age")


@dataclass(frozen=True)
class Case:
    """One subject: image path, label path (None if unlabelled), site and gestational age when known."""

    case_id: str
    image: Path
    label: Path | None
    site: str = ""
    ga_weeks: float | None = None

    def as_item(self) -> dict:
        """MONAI datalist item (``image``/``label`` keys as the bundle's transforms expect)."""
        item = {"image": str(self.image), "case_id": self.case_id, "site": self.site}
        if self.label is not None:
            item["label"] = str(self.label)
        return item

    def to_json(self) -> dict:
        d = asdict(self)
        d["image"] = str(self.image)
        d["label"] = str(self.label) if self.label else None
        return d


def is_bids(root: Path) -> bool:
    return (root / "dataset_description.json").is_file() or any(root.glob("sub-*/anat"))


def _participants_ga(root: Path) -> dict[str, float]:
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    ages: dict[str, float] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            pid = (row.get("participant_id") or "").strip()
            for col in GA_COLUMNS:
                if row.get(col) not in (None, "", "n/a"):
                    with contextlib.suppress(ValueError):
                        ages[pid] = float(row[col])
                    break
    return ages


def load_feta_bids(root: str | Path, *, site: str | None = None) -> list[Case]:
    """Cases of a FeTA BIDS dataset (labels optional: unlabelled subjects get ``label=None``)."""
    root = Path(root)
    site = site or root.name
    ages = _participants_ga(root)
    cases = []
    for anat in sorted(root.glob("sub-*/anat")):
        for image in sorted(anat.iterdir()):
            stem = stem_of(image)
            match = _BIDS_IMAGE.match(stem)
            if not match or not suffix_of(image):
                continue
            subject = match.group(1)
            label = None
            for suffix in IMAGE_SUFFIXES:
                candidate = anat / f"{stem[: -len('_T2w')]}_dseg{suffix}"
                if candidate.is_file():
                    label = candidate
                    break
            case_id = f"{site}/{stem}" if site else stem
            cases.append(Case(case_id, image, label, site, ages.get(subject)))
    return cases


def _label_for(image: Path, label_dirs: Sequence[Path]) -> Path | None:
    stem = stem_of(image)
    for folder in label_dirs:
        for marker in ("", *LABEL_MARKERS):
            for suffix in IMAGE_SUFFIXES:
                candidate = folder / f"{stem}{marker}{suffix}"
                if candidate.is_file() and candidate != image:
                    return candidate
    return None


def load_image_folder(root: str | Path, *, site: str | None = None) -> list[Case]:
    """Cases of a plain folder (``images/``+``labels/``, flat with ``_seg`` suffixes, or a MONAI Label datastore)."""
    root = Path(root)
    site = site or root.name
    for img_dir, lab_dir in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / img_dir).is_dir():
            images = [p for p in sorted((root / img_dir).iterdir()) if p.is_file() and suffix_of(p)]
            return [Case(f"{site}/{stem_of(p)}", p, _label_for(p, [root / lab_dir]), site) for p in images]
    images = [p for p in sorted(root.iterdir()) if p.is_file() and suffix_of(p) and not is_label_name(p)]
    label_dirs = [root / "labels" / "final", root]
    return [Case(f"{site}/{stem_of(p)}", p, _label_for(p, label_dirs), site) for p in images]


def load_dataset(
    root: str | Path, *, site: str | None = None, require_labels: bool = True, validate: bool = True
) -> list[Case]:
    """Cases of ``root`` in whichever supported layout it has; validated unless ``validate=False``.

    Raises :class:`DataValidationError` listing every problem (missing folder, empty folder, unreadable or
    corrupt files, shape/affine mismatches, 2D/4D input, labels outside 0..7, missing labels).
    """
    root = Path(root)
    if not root.exists():
        raise DataValidationError([f"dataset folder {root} does not exist"])
    if not root.is_dir():
        raise DataValidationError([f"{root} is not a folder"])
    cases = load_feta_bids(root, site=site) if is_bids(root) else load_image_folder(root, site=site)
    if not cases:
        raise DataValidationError(
            [
                f"no images found in {root} (expected FeTA BIDS sub-*/anat/*_T2w.nii.gz, images/ + labels/, or "
                "image files with _seg/_dseg label files)"
            ]
        )
    if validate:
        validate_cases(cases, require_labels=require_labels).raise_if_failed(context=str(root))
    return cases


def split_cases(cases: Sequence[Case], *, val_fraction: float, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic train/held-out split per site, stable when cases are added (hash of id and seed).

    Each site keeps at least one training and, if it has two or more cases, one held-out case.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train: list[Case] = []
    held_out: list[Case] = []
    for site in sorted({c.site for c in cases}):
        site_cases = sorted(
            (c for c in cases if c.site == site),
            key=lambda c: hashlib.sha256(f"{seed}:{c.case_id}".encode()).hexdigest(),
        )
        n_val = round(len(site_cases) * val_fraction)
        if val_fraction > 0 and len(site_cases) >= 2:
            n_val = min(max(n_val, 1), len(site_cases) - 1)
        held_out.extend(sorted(site_cases[:n_val], key=lambda c: c.case_id))
        train.extend(sorted(site_cases[n_val:], key=lambda c: c.case_id))
    return train, held_out


__all__ = ["Case", "DataValidationError", "load_dataset", "load_feta_bids", "load_image_folder", "split_cases"]
