"""Tissue names, values and colours, read from the server's ``/info/``; conversion label array <-> named segments.

Why from the server: the MONAI bundle is the project's single definition of the labels; the app reports them in
``/info/``. Nothing here names a tissue, so a new bundle (or another label set) needs no change in Slicer.

Accepted ``/info/`` shapes (model-level entries win over top-level ones):

- ``label_info`` (a list of label entries, preferred when present) or ``labels``: ``{"name": value}`` (MONAI
  Label's usual form), ``["name", ...]`` (value = position, or position + 1
  when the list does not start with ``background``), or ``[{"name", "value", "display_name"?, "color"?}, ...]``;
- colours: ``color``/``colour`` in a label entry, or a ``label_colors``/``label_colours`` mapping (by name or by
  value) at model level, in the model's ``config`` or at top level; ``[r, g, b]`` 0..255, 0..1 floats or ``#rrggbb``;
- display names: ``display_name`` in a label entry or a ``label_display_names`` mapping; else the name with spaces.

A label without a colour from the server gets a generated one (and ``color_from_server`` False) and a warning.
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CorrectionInvalidError, ProtocolError

log = logging.getLogger(__name__)

BACKGROUND_NAMES = ("background", "_background_", "bg")


@dataclass(frozen=True)
class TissueLabel:
    """One foreground label: the server's ``name`` is the key, ``display_name`` is what the radiologist reads."""

    value: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    color_from_server: bool = True

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Colour as 0..1 floats (Slicer's segment colour)."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]


@dataclass(frozen=True)
class LabelSet:
    """The server's foreground labels, sorted by value. Value 0 is background and never a segment."""

    labels: tuple[TissueLabel, ...]

    def __post_init__(self) -> None:
        values = [lab.value for lab in self.labels]
        names = [lab.name for lab in self.labels]
        if not self.labels:
            raise ProtocolError("The server reported no tissue labels, so there is nothing to segment.")
        if len(set(values)) != len(values) or len(set(names)) != len(names):
            raise ProtocolError(f"The server reported duplicate label names or values: {dict(zip(names, values))}.")
        if min(values) < 1 or max(values) > 65535:
            raise ProtocolError(f"The server's label values must be within 1..65535, got {values}.")

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_info(cls, info: Mapping[str, Any], model: str | None = None) -> LabelSet:
        """Read the labels of ``model`` (or the app's labels) from a ``/info/`` answer; see the module doc."""
        if not isinstance(info, Mapping):
            raise ProtocolError("The server's /info/ answer is not a JSON object.")
        model_info = _model_section(info, model)
        raw = next(
            (src.get(key) for key in ("label_info", "labels") for src in (model_info, info) if src.get(key)), None
        )
        entries = _label_entries(raw)
        colours = _merged_mapping(info, model_info, ("label_colors", "label_colours"))
        display = _merged_mapping(info, model_info, ("label_display_names",))
        labels = []
        for entry in entries:
            name, value = entry["name"], entry["value"]
            if value == 0 or name.lower() in BACKGROUND_NAMES:
                continue
            raw_colour = entry.get("color", entry.get("colour"))
            if raw_colour is None:
                raw_colour = colours.get(name, colours.get(str(value)))
            colour = _parse_color(raw_colour, name) if raw_colour is not None else None
            shown = entry.get("display_name") or display.get(name) or display.get(str(value)) or _humanize(name)
            if colour is None:
                log.warning("the server gives no colour for label %r; using a generated one", name)
                labels.append(TissueLabel(value, name, str(shown), _generated_color(value), color_from_server=False))
            else:
                labels.append(TissueLabel(value, name, str(shown), colour))
        return cls(tuple(sorted(labels, key=lambda lab: lab.value)))

    def to_json(self) -> list[dict[str, Any]]:
        """JSON form (the module stores it beside a saved segmentation)."""
        return [
            {"value": lab.value, "name": lab.name, "display_name": lab.display_name, "color": list(lab.color)}
            for lab in self.labels
        ]

    @classmethod
    def from_json(cls, data: Iterable[Mapping[str, Any]]) -> LabelSet:
        """Inverse of :meth:`to_json`."""
        return cls.from_info({"labels": list(data)})

    # ----------------------------------------------------------------------------------------------------------
    @property
    def values(self) -> tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lab.name for lab in self.labels)

    @property
    def max_value(self) -> int:
        return max(self.values)

    def by_value(self, value: int) -> TissueLabel:
        for lab in self.labels:
            if lab.value == int(value):
                return lab
        raise KeyError(f"no label with value {value}")

    def find(self, key: str) -> TissueLabel | None:
        """The label whose name or display name is ``key`` (case-insensitive), else None."""
        k = key.strip().lower()
        for lab in self.labels:
            if k in (lab.name.lower(), lab.display_name.lower()):
                return lab
        return None

    # ----------------------------------------------------------------------------------------------------------
    def split(self, label_array: np.ndarray) -> dict[str, np.ndarray]:
        """One boolean mask per label name (empty masks included, so every tissue exists as a segment)."""
        array = np.asarray(label_array)
        return {lab.name: array == lab.value for lab in self.labels}

    def compose(self, masks: Mapping[str, np.ndarray], shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Label array from named masks (key = name or display name); overlaps or unknown names are errors.

        Why strict: the server stores one tissue per voxel; silently letting one segment win would change the
        radiologist's correction without telling them.
        """
        problems = []
        resolved: list[tuple[TissueLabel, np.ndarray]] = []
        for key, mask in masks.items():
            lab = self.find(key)
            if lab is None:
                problems.append(
                    f"Segment '{key}' is not one of the server's tissues ({', '.join(self.display_names())}); "
                    "rename it to one of them or delete it."
                )
                continue
            resolved.append((lab, np.asarray(mask, dtype=bool)))
        if shape is None:
            if not resolved:
                raise CorrectionInvalidError(problems or ["There are no segments to send."])
            shape = resolved[0][1].shape
        dtype = np.uint8 if self.max_value <= 255 else np.uint16
        out = np.zeros(shape, dtype=dtype)
        seen: dict[int, str] = {}
        for lab, mask in resolved:
            if mask.shape != tuple(shape):
                problems.append(f"Segment '{lab.display_name}' has shape {mask.shape}, expected {tuple(shape)}.")
                continue
            if lab.value in seen:
                problems.append(f"Two segments are both '{lab.display_name}' ('{seen[lab.value]}' and this one).")
                continue
            seen[lab.value] = lab.display_name
            clash = mask & (out != 0)
            if clash.any():
                others = sorted({self.by_value(int(v)).display_name for v in np.unique(out[clash])})
                problems.append(
                    f"Segment '{lab.display_name}' overlaps {', '.join(others)} in {int(clash.sum())} voxels; "
                    "each voxel must belong to one tissue (Segment Editor: Masking > 'Overwrite all')."
                )
            out[mask & (out == 0)] = lab.value
        if problems:
            raise CorrectionInvalidError(problems)
        return out

    def display_names(self) -> list[str]:
        return [lab.display_name for lab in self.labels]


# ---------------------------------------------------------------------------------------------------------------


def _model_section(info: Mapping[str, Any], model: str | None) -> Mapping[str, Any]:
    models = info.get("models") or {}
    if not isinstance(models, Mapping):
        return {}
    if model is not None:
        section = models.get(model)
        if section is None:
            raise ProtocolError(f"The server has no model named '{model}' (it has: {', '.join(models) or 'none'}).")
        return section if isinstance(section, Mapping) else {}
    return {}


def _merged_mapping(info: Mapping[str, Any], model_info: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Top-level, then model config, then model-level mappings (later ones win); keys made strings."""
    out: dict[str, Any] = {}
    config = model_info.get("config") if isinstance(model_info.get("config"), Mapping) else {}
    for source in (info, config, model_info):
        for key in keys:
            value = source.get(key)  # type: ignore[union-attr]
            if isinstance(value, Mapping):
                out.update({str(k): v for k, v in value.items()})
    return out


def _label_entries(raw: Any) -> list[dict[str, Any]]:
    if not raw:
        raise ProtocolError("The server's /info/ lists no labels; it may not be the fetal brain segmentation app.")
    entries: list[dict[str, Any]] = []
    if isinstance(raw, Mapping):
        for name, value in raw.items():
            entries.append({"name": str(name), "value": _as_value(value, name)})
    elif isinstance(raw, (list, tuple)):
        first = raw[0]
        offset = 0 if (isinstance(first, str) and first.lower() in BACKGROUND_NAMES) else 1
        for i, item in enumerate(raw):
            if isinstance(item, str):
                entries.append({"name": item, "value": i + offset})
            elif isinstance(item, Mapping):
                name = item.get("name", item.get("id"))
                if name is None or "value" not in item:
                    raise ProtocolError(f"A label in the server's /info/ lacks a name or value: {dict(item)}.")
                entry = dict(item)
                entry["name"], entry["value"] = str(name), _as_value(item["value"], name)
                entries.append(entry)
            else:
                raise ProtocolError(f"Cannot read the label {item!r} in the server's /info/.")
    else:
        raise ProtocolError(f"Cannot read the labels in the server's /info/: {raw!r}.")
    return entries


def _as_value(value: Any, name: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"Label '{name}' has a non-integer value {value!r} in the server's /info/.") from None
    if v != value and not isinstance(value, str):
        raise ProtocolError(f"Label '{name}' has a non-integer value {value!r} in the server's /info/.")
    return v


def _parse_color(raw: Any, name: str) -> tuple[int, int, int]:
    try:
        if isinstance(raw, str):
            text = raw.strip().lstrip("#")
            if len(text) != 6:
                raise ValueError
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        values = [float(c) for c in raw][:3]
        if len(values) != 3:
            raise ValueError
        if all(0.0 <= c <= 1.0 for c in values) and any(c != int(c) for c in values):
            values = [c * 255.0 for c in values]
        if not all(0.0 <= c <= 255.0 for c in values):
            raise ValueError
        return tuple(round(c) for c in values)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise ProtocolError(f"The server gives label '{name}' an unreadable colour {raw!r}.") from None


def _humanize(name: str) -> str:
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _generated_color(value: int) -> tuple[int, int, int]:
    """A distinct, stable colour for a value (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.65, 0.9)
    return (int(r * 255), int(g * 255), int(b * 255))
