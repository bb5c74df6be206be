"""Gestational-age-aware checks of what the server returns (``/infer``) and receives (corrections).

The maths and the published curve are the core's (:mod:`fetalseg.qc`, :mod:`fetalseg.growth`); this module finds
the case's GA and turns problems into HTTP answers:

* GA, first found wins: the request's ``ga_weeks`` parameter, the DICOM series' Last Menstrual Date (with its
  study date), the studies folder's ``participants.tsv`` (FeTA BIDS; the participant id is the image id or its
  ``sub-XXX`` prefix). Unknown GA: volumes are reported with no flags and a sentence saying so (no error).
* An absurd GA (not a number, outside 15-45 weeks) is a 400 when the client sent it, a 422 when a stored file holds
  it; both are raised before the model runs or anything is stored.
* A correction with flagged volumes is refused with 409 unless its params say ``"confirm_qc": true``. Nothing is
  stored without that confirmation, so fine-tuning (``final`` labels) and the export for federated training only
  ever see corrections that passed or were confirmed; the stored label's info keeps the check and who confirmed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from apps.fetal_brain.lib.errors import BadRequestError, ConflictError, UnprocessableError
from apps.fetal_brain.lib.volumes import image_geometry, load_label_for
from fetalseg.data.io import stem_of
from fetalseg.qc import GestationalAgeError, assess_label, ga_from_dicom, ga_from_participants, parse_ga

CONFIRM_PARAM = "confirm_qc"
GA_PARAM = "ga_weeks"


def _stored_ga(image: Path) -> tuple[float | None, str | None]:
    """GA recorded with the image itself (DICOM tags) or next to it (participants.tsv), checked."""
    try:
        if image.is_dir():
            ga = ga_from_dicom(image)
            if ga is not None:
                return ga, "dicom"
        ga = ga_from_participants(image.parent, stem_of(image) if image.is_file() else image.name)
        if ga is not None:
            return ga, "participants.tsv"
    except GestationalAgeError as exc:
        raise UnprocessableError(f"image {image.name}: {exc}") from exc
    return None, None


def resolve_ga(image: str | Path | None, requested: Any) -> tuple[float | None, str | None]:
    """(GA in weeks or None, where it came from): the request's value first, then what is stored with the image."""
    try:
        ga = parse_ga(requested, source=GA_PARAM)
    except GestationalAgeError as exc:
        raise BadRequestError(str(exc)) from exc
    if ga is not None:
        return ga, "request"
    if image is None:
        return None, None
    return _stored_ga(Path(image))


def check_result(label: np.ndarray, affine: np.ndarray, *, image: str | Path | None, requested: Any) -> dict:
    """The QC report of a segmentation the server returns (goes into the ``/infer`` response's params)."""
    ga, source = resolve_ga(image, requested)
    return assess_label(label, affine, ga, ga_source=source)


def _confirmed(params: dict[str, Any]) -> bool:
    value = params.get(CONFIRM_PARAM, False)
    if isinstance(value, str):
        value = value.strip().lower()
        if value in ("true", "1", "yes"):
            return True
        if value in ("false", "0", "no", ""):
            return False
    if isinstance(value, bool):
        return value
    raise BadRequestError(f"{CONFIRM_PARAM} must be true or false, got {value!r}")


def check_correction(image: Path, label_file: str | Path, params: dict[str, Any]) -> dict:
    """The QC report of a correction (an uploaded label file) about to be stored; 409 when flagged and not
    confirmed. The label is read as the datastore will store it (on the image's grid, values checked)."""
    confirmed = _confirmed(params)
    ga, source = resolve_ga(image, params.get(GA_PARAM))
    label = load_label_for(image, label_file)
    _, affine = image_geometry(image)
    report = assess_label(label, affine, ga, ga_source=source)
    if report["flagged"] and not confirmed:
        raise ConflictError(
            [
                *report["flags"],
                f"the correction was not stored: check it, then send it again with params "
                f'{{"{CONFIRM_PARAM}": true}} to use it for fine-tuning and federated training anyway',
            ]
        )
    report["confirmed"] = bool(report["flagged"] and confirmed)
    return report
