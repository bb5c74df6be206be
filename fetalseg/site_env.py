"""A site's environment: the variables that say where its data, its per-job state and its privacy ledger are, and
the one rule that finds its data folder.

In core so that every part that runs at a site (the federated client, the privacy filters, the app) reads them
the same way without importing each other: a hospital sets these once in its client's environment and never edits
a job config. The variables are read by :class:`fetalseg.settings.SiteSettings` (``FETAL_FL_*``; the older
``FETALFL_*`` names still work, with a deprecation warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fetalseg.settings import SiteSettings, env_names

ENV_SITE_DATA = env_names(SiteSettings, "site_data")[0]  # a site's own data folder (wins over everything)
ENV_DATA_ROOT = env_names(SiteSettings, "data_root")[0]  # parent folder holding <site name>/ (wins over data.root)
ENV_SITE_STATE = env_names(SiteSettings, "site_state")[0]  # per-job state that must survive a client restart
ENV_PRIVACY_LEDGER = env_names(SiteSettings, "privacy_ledger")[0]  # a site's privacy ledger, across jobs
# every name of the four, deprecated ones included (tests and launchers clear them all)
SITE_VARIABLES = tuple(name for field in SiteSettings.model_fields for name in env_names(SiteSettings, field))


class SiteDataError(ValueError):
    """A site whose data folder cannot be worked out."""


def site_data_dir(site: str, data_root: str | Path | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """Where ``site`` finds its cases: ``$FETAL_FL_SITE_DATA``, else ``<$FETAL_FL_DATA_ROOT or data_root>/<site>``.

    ``data_root`` is the job's ``data.root`` (for simulations where all sites share one machine); ``environ``
    defaults to this process's environment.
    """
    settings = SiteSettings.load(environ)
    if settings.site_data:
        return Path(settings.site_data).expanduser()
    root = settings.data_root or data_root
    if not root:
        raise SiteDataError(
            f"site {site!r} has no data folder: set {ENV_SITE_DATA} (the site's folder) or {ENV_DATA_ROOT} "
            "(a folder containing <site name>/), or data.root in the job config"
        )
    return Path(root).expanduser() / site


def site_dataset_id(site: str, data_dir: str | Path) -> str:
    """The dataset a site's privacy ledger charges for training on ``data_dir``: ``<site>/<data folder name>``."""
    return f"{site}/{Path(data_dir).name}"


def site_state(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$FETAL_FL_SITE_STATE`` as a path, or None when unset."""
    return SiteSettings.load(environ).state_dir


def privacy_ledger(environ: Mapping[str, str] | None = None) -> str | None:
    """``$FETAL_FL_PRIVACY_LEDGER``, or None when unset."""
    return SiteSettings.load(environ).privacy_ledger
