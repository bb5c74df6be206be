"""Where the project's one MONAI bundle lives.

The bundle sits inside the MONAI Label app (``apps/fetal_brain/model/fetal_brain_seg``) because that is where MONAI
Label users expect it; every other part of the project finds it through :func:`bundle_dir`. ``FETAL_FL_BUNDLE_DIR``
(deprecated: ``FETALSEG_BUNDLE_DIR``; :class:`fetalseg.settings.BundleSettings`) points at another copy (e.g. a
site's installed bundle) without code changes.
"""

from __future__ import annotations

from pathlib import Path

from fetalseg.settings import BundleSettings, env_names

BUNDLE_NAME = "fetal_brain_seg"
REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "fetal_brain"
DEFAULT_BUNDLE_DIR = APP_DIR / "model" / BUNDLE_NAME
ENV_BUNDLE_DIR = env_names(BundleSettings, "bundle_dir")[0]


def bundle_dir() -> Path:
    """Return the bundle root, honouring ``FETAL_FL_BUNDLE_DIR``; raise if it is not a bundle."""
    root = Path(BundleSettings.load().bundle_dir or DEFAULT_BUNDLE_DIR).expanduser().resolve()
    if not (root / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(
            f"no MONAI bundle at {root} (expected configs/metadata.json); set {ENV_BUNDLE_DIR} to a bundle folder"
        )
    return root
