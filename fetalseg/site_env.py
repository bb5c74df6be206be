"""A site's environment: the variables that say where its data, its per-job state and its privacy ledger are, and
the one rule that finds its data folder.

In core so that every part that runs at a site (the federated client, the privacy filters, the app) reads them
the same way without importing each other: a hospital sets these once in its client's environment and never edits
a job config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_SITE_DATA = "FETALFL_SITE_DATA"  # a site's own data folder (wins over everything)
ENV_DATA_ROOT = "FETALFL_DATA_ROOT"  # parent folder holding <site name>/ (wins over the job config's data.root)
ENV_SITE_STATE = "FETALFL_SITE_STATE"  # where a site keeps per-job state that must survive a client restart
ENV_PRIVACY_LEDGER = "FETALFL_PRIVACY_LEDGER"  # a site's privacy ledger (privacy.ledger.SiteLedger), across jobs


class SiteDataError(ValueError):
    """A site whose data folder cannot be worked out."""


def site_data_dir(site: str, data_root: str | Path | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """Where ``site`` finds its cases: ``$FETALFL_SITE_DATA``, else ``<$FETALFL_DATA_ROOT or data_root>/<site>``.

    ``data_root`` is the job's ``data.root`` (for simulations where all sites share one machine); ``environ``
    defaults to this process's environment.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_SITE_DATA):
        return Path(env[ENV_SITE_DATA]).expanduser()
    root = env.get(ENV_DATA_ROOT) or data_root
    if not root:
        raise SiteDataError(
            f"site {site!r} has no data folder: set {ENV_SITE_DATA} (the site's folder) or {ENV_DATA_ROOT} "
            "(a folder containing <site name>/), or data.root in the job config"
        )
    return Path(root).expanduser() / site


def site_dataset_id(site: str, data_dir: str | Path) -> str:
    """The dataset a site's privacy ledger charges for training on ``data_dir``: ``<site>/<data folder name>``."""
    return f"{site}/{Path(data_dir).name}"
