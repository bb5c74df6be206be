"""fetalseg.site_env: the one rule that finds a site's data folder, and the dataset id its ledger charges."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetalseg.site_env import ENV_DATA_ROOT, ENV_SITE_DATA, SiteDataError, site_data_dir, site_dataset_id


def test_the_sites_own_folder_wins_then_the_data_root_variable_then_the_jobs_root() -> None:
    env = {ENV_SITE_DATA: "/h/feta", ENV_DATA_ROOT: "/env-root"}
    assert site_data_dir("site-2", "/job-root", environ=env) == Path("/h/feta")
    assert site_data_dir("site-2", "/job-root", environ={ENV_DATA_ROOT: "/env-root"}) == Path("/env-root/site-2")
    assert site_data_dir("site-2", "/job-root", environ={}) == Path("/job-root/site-2")
    assert site_data_dir("site-2", None, environ={ENV_SITE_DATA: "", ENV_DATA_ROOT: "/r"}) == Path("/r/site-2")


def test_no_folder_at_all_is_a_clear_error_naming_what_to_set() -> None:
    with pytest.raises(SiteDataError, match=f"site 'site-2' has no data folder: set {ENV_SITE_DATA}"):
        site_data_dir("site-2", None, environ={})
    assert issubclass(SiteDataError, ValueError)


def test_the_dataset_id_is_the_site_and_its_folder_name() -> None:
    assert site_dataset_id("site-2", Path("/h/feta_2025")) == "site-2/feta_2025"
    assert site_dataset_id("site-2", site_data_dir("site-2", "/root", environ={})) == "site-2/site-2"
