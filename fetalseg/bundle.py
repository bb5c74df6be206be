"""Load the project's one model definition from the MONAI bundle.

The network, transforms, patch size, loss and inferer are written once, in the bundle's ``configs/*.json``.
:class:`Bundle` parses them with MONAI's own ``ConfigParser`` (so ``python -m monai.bundle run`` sees exactly the
same objects) and hands out fresh instances; nothing here re-types a layer or a transform.

A ``variant`` adds an overlay from ``configs/variants/`` (``tiny`` for test volumes, ``feta`` for real FeTA data), as
MONAI Model Zoo bundles do; ``overrides`` change single config values by id (e.g. ``{"max_epochs": 3}``) the way
MONAI's ``--key value`` command-line overrides do, instead of editing the JSON.
"""

from __future__ import annotations

import pydoc
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

from fetalseg.paths import bundle_dir
from fetalseg.plumbing import atomic_open

CONFIG_FILES = {
    "train": ("common.json", "train.json"),
    "inference": ("common.json", "inference.json"),
    "common": ("common.json",),
}
CHECKPOINT_NAME = "model.pt"


class _SnapshotLocator(ComponentLocator):
    """MONAI's locator, reading ``sys.modules`` from a copy.

    MONAI walks ``sys.modules`` key by key in Python; when another thread imports meanwhile (an NVFlare site's
    communication threads do, right after ``flare.init()``) the walk raises "dictionary changed size during
    iteration" and the site dies at start-up (seen in about 1 in 6 site starts under load). ``list(sys.modules)``
    copies the keys in one C call under the GIL, so the walk sees one consistent set.
    """

    def _find_module_names(self) -> list[str]:
        return [m for m in list(sys.modules) if m.startswith(self.MOD_START) and all(s not in m for s in self.excludes)]


class Bundle:
    """A parsed view of the bundle for one purpose ("train", "inference" or "common")."""

    def __init__(
        self,
        purpose: str = "train",
        *,
        root: str | Path | None = None,
        variant: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if purpose not in CONFIG_FILES:
            raise ValueError(f"purpose must be one of {sorted(CONFIG_FILES)}, got {purpose!r}")
        self.purpose = purpose
        self.root = Path(root).resolve() if root is not None else bundle_dir()
        self.overrides = dict(overrides or {})
        self.parser = ConfigParser()
        self.parser.locator = _SnapshotLocator()  # see the class: thread-safe module listing
        self.parser.read_meta(str(self.root / "configs" / "metadata.json"))
        files = [self.root / "configs" / name for name in CONFIG_FILES[purpose]]
        self.variant = variant
        if variant:
            overlay = self.root / "configs" / "variants" / f"{variant}.json"
            if not overlay.is_file():
                raise ValueError(f"unknown bundle variant {variant!r}; available: {', '.join(variants(self.root))}")
            files.append(overlay)
        self.parser.read_config([str(f) for f in files])
        self.parser["bundle_root"] = str(self.root)
        for key, value in self.overrides.items():
            self.parser[key] = value
        self.parser.parse(reset=True)

    # -- plain values ------------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A parsed config value, e.g. ``bundle.get("max_epochs")``."""
        return self.parser.get_parsed_content(key, default=default)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.parser.get("_meta_"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0"))

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.parser.get_parsed_content("patch_size"))

    @property
    def pixdim(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.parser.get_parsed_content("pixdim"))

    @property
    def num_classes(self) -> int:
        return int(self.parser.get_parsed_content("num_classes"))

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.parser.get_parsed_content("ckpt_dir")) / CHECKPOINT_NAME

    # -- fresh objects (instantiate=True creates a new instance each call) --------------------------------------
    def _fresh(self, key: str) -> Any:
        return self.parser.get_parsed_content(key, instantiate=True, lazy=False)

    def network(self, *, device: str | torch.device = "cpu") -> torch.nn.Module:
        """A new, randomly initialised network as defined in ``network_def``."""
        return self._fresh("network_def").to(device)

    def preprocessing(self) -> Any:
        """Deterministic pre-processing (load, orient, resample, normalise) shared by train, eval and infer."""
        return self._fresh("preprocessing")

    def train_transforms(self) -> Any:
        self._require("train")
        return self._fresh("train_transforms")

    def augmentation_transforms(self) -> list[Any]:
        """Only the random part of training (patching, flips, intensity), for cached pre-processed data.

        With ``domain_randomization`` on, its transforms come first, in the order ``train_transforms`` uses."""
        self._require("train")
        return self.domain_randomization_transforms() + list(self._fresh("augmentation_transforms"))

    def domain_randomization_transforms(self) -> list[Any]:
        """The SynthSeg-style acquisition randomization of ``train.json`` when its switch is on, else ``[]``."""
        self._require("train")
        if not bool(self.get("domain_randomization", False)):
            return []
        return list(self._fresh("domain_randomization_transforms"))

    def loss(self) -> torch.nn.Module:
        return self._fresh("loss")

    def inferer(self) -> Any:
        return self._fresh("inferer")

    def optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimizer of ``train.json`` bound to ``params`` (not to the bundle's own network instance)."""
        self._require("train")
        cfg = dict(self.parser.get("optimizer"))
        target = cfg.pop("_target_")
        kwargs = {k: self.parser.get_parsed_content(f"optimizer#{k}") for k in cfg if k != "params"}
        cls = pydoc.locate(target)
        if cls is None:
            raise ImportError(f"optimizer class {target!r} in train.json cannot be imported")
        return cls(params, **kwargs)

    def _require(self, purpose: str) -> None:
        if self.purpose != purpose:
            raise RuntimeError(f"this Bundle was parsed for {self.purpose!r}; use Bundle({purpose!r})")


def variants(root: str | Path | None = None) -> list[str]:
    """Names of the bundle's variant overlays (``configs/variants/*.json``)."""
    folder = Path(root or bundle_dir()) / "configs" / "variants"
    return sorted(p.stem for p in folder.glob("*.json"))


def load_checkpoint_file(path: str | Path, *, map_location: str = "cpu", trust_pickle: bool = False) -> Any:
    """What a checkpoint file holds: the project's ONE ``torch.load``, with ``weights_only=True``.

    Only tensors and plain containers and values (dict, OrderedDict, list, tuple, str, numbers, None) are read; a
    file that pickles any other object is refused (``pickle.UnpicklingError``) before that object is built, so a
    checkpoint from elsewhere cannot run code here. NVFlare's own ``FL_global_model.pt`` loads this way too (it is
    ``{"model": OrderedDict of tensors, "meta_props": dict, "train_conf": dict}``), so no allow-list is needed.
    ``trust_pickle=True`` lifts the restriction for a file from a source the caller trusts; only an explicit admin
    option (``fetal-fl app install-model --trust-pickle``) passes it.
    """
    return torch.load(Path(path), map_location=map_location, weights_only=not trust_pickle)


def load_checkpoint(network: torch.nn.Module, path: str | Path, *, map_location: str = "cpu") -> dict[str, Any]:
    """Load weights saved by :func:`save_checkpoint` (or a bare state dict); return the checkpoint's extra info."""
    ckpt = load_checkpoint_file(path, map_location=map_location)  # a file cannot run code here
    if isinstance(ckpt, Mapping) and "model" in ckpt and isinstance(ckpt["model"], Mapping):
        load_weights(network, ckpt["model"])
        return {k: v for k, v in ckpt.items() if k != "model"}
    load_weights(network, ckpt)  # a bare state dict, as MONAI's CheckpointSaver writes with save_dict={"model":..}
    return {}


def load_weights(network: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """``load_state_dict`` (strict), except that a model saved before the bundle's norm became affine (0.1.0) loads:
    its missing instance-norm scale and shift keep their identity start, which computes exactly what it computed."""
    from fetalseg.subspace import GROUPS

    missing, unexpected = network.load_state_dict(dict(state), strict=False)
    norm = set(GROUPS["norm"](network))
    if unexpected or set(missing) - norm:
        network.load_state_dict(dict(state), strict=True)  # raises with torch's own message
    for name, value in network.named_parameters():
        if name in missing:
            torch.nn.init.ones_(value) if name.endswith("weight") else torch.nn.init.zeros_(value)


def save_checkpoint(network: torch.nn.Module, path: str | Path, **info: Any) -> Path:
    """Write ``{"model": state_dict, **info}`` atomically (:func:`fetalseg.plumbing.atomic_open`): a reader never sees
    half a model, and concurrent writers never share a temporary file.

    The format is what the bundle's ``CheckpointLoader(load_dict={"model": ...})`` reads.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    with atomic_open(path, "wb") as fh:
        torch.save({"model": state, **info}, fh)
    return path
