"""Where the project's one MONAI bundle lives.

The bundle sits inside the MONAI Label app (``apps/fetal_brain/model/fetal_brain_seg``) because that is where MONAI
Label users expect it; every other part of the project finds it through :func:`bundle_dir`. ``FETALSEG_BUNDLE_DIR``
points at another copy (e.g. a site's installed bundle) without code changes.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLE_NAME = "fetal_brain_seg"
REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "fetal_brain"
DEFAULT_BUNDLE_DIR = APP_DIR / "model" / BUNDLE_NAME
ENV_BUNDLE_DIR = "FETALSEG_BUNDLE_DIR"


def bundle_dir() -> Path:
    """Return the bundle root, honouring ``FETALSEG_BUNDLE_DIR``; raise if it is not a bundle."""
    root = Path(os.environ.get(ENV_BUNDLE_DIR, DEFAULT_BUNDLE_DIR)).expanduser().resolve()
    if not (root / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(
            f"no MONAI bundle at {root} (expected configs/metadata.json); set {ENV_BUNDLE_DIR} to a bundle folder"
        )
    return root
