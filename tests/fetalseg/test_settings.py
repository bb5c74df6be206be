"""The process environment in one place (fetalseg.settings): new names, deprecated aliases, bad values, the docs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from fetalseg import settings
from fetalseg.paths import bundle_dir
from fetalseg.settings import (
    DEPRECATED,
    PREFIX,
    SETTINGS,
    CryptenSettings,
    SettingsError,
    SiteSettings,
    markdown_table,
    variables,
)
from fetalseg.site_env import site_data_dir

CONFIGURATION_MD = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_new_name_is_read_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        site = SiteSettings.load({"FETAL_FL_SITE_STATE": "/state", "FETAL_FL_PRIVACY_LEDGER": "/l.json"})
    assert (site.site_state, site.privacy_ledger, site.site_data) == ("/state", "/l.json", None)


def test_an_old_name_still_works_and_warns_once_in_the_log(caplog, monkeypatch):
    monkeypatch.setattr(settings, "_LOGGED", set())
    env = {"FETALFL_SITE_DATA": "/hospital/feta"}
    with caplog.at_level(logging.WARNING, logger="fetalseg.settings"):
        with pytest.warns(DeprecationWarning, match=r"\$FETALFL_SITE_DATA is deprecated: set \$FETAL_FL_SITE_DATA"):
            assert site_data_dir("site-1", None, environ=env) == Path("/hospital/feta")
        with pytest.warns(DeprecationWarning):
            SiteSettings.load(env)
    assert caplog.text.count("FETALFL_SITE_DATA is deprecated") == 1


def test_the_new_name_wins_over_the_old_one_and_the_old_one_is_not_reported_as_used():
    env = {"FETAL_FL_DATA_ROOT": "/new", "FETALFL_DATA_ROOT": "/old"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert site_data_dir("site-2", "/job", environ=env) == Path("/new/site-2")


def test_empty_means_unset():
    assert site_data_dir("site-2", "/job", environ={"FETAL_FL_SITE_DATA": "", "FETAL_FL_DATA_ROOT": ""}) == Path(
        "/job/site-2"
    )


def test_a_bad_value_names_the_variable_that_was_set():
    with pytest.raises(SettingsError, match=r"FETAL_FL_CRYPTEN_PRECISION_BITS: .*integer.*'many'"):
        CryptenSettings.load({"FETAL_FL_CRYPTEN_PRECISION_BITS": "many"})
    with pytest.raises(SettingsError, match=r"FETAL_FL_CRYPTEN_PRECISION_BITS: .*less than or equal to 30"):
        CryptenSettings.load({"FETAL_FL_CRYPTEN_PRECISION_BITS": "64"})
    assert CryptenSettings.load({}).crypten_precision_bits == 16


def test_the_process_environment_is_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FETAL_FL_BUNDLE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FETAL_FL_BUNDLE_DIR"):
        bundle_dir()
    monkeypatch.delenv("FETAL_FL_BUNDLE_DIR")
    monkeypatch.setenv("FETALSEG_BUNDLE_DIR", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match="FETALSEG_BUNDLE_DIR"), pytest.raises(FileNotFoundError, match="old"):
        bundle_dir()


def test_new_names_share_one_prefix_and_old_names_are_only_aliases():
    names = [name for name, *_ in variables()]
    assert len(names) == len(set(names))
    # the users file keeps the app's own FETAL_BRAIN_ name: it is the app setting users_file (see docs)
    assert all(n.startswith(PREFIX) for n in names if n != "FETAL_BRAIN_USERS_FILE")
    assert set(DEPRECATED) == {old for _, olds, *_ in variables() for old in olds}
    assert not set(DEPRECATED) & set(names)


def test_every_variable_is_documented_and_every_documented_one_exists():
    """docs/configuration.md holds the table generated from the classes; regenerate it with
    ``python -c "from fetalseg.settings import markdown_table; print(markdown_table())"``."""
    page = CONFIGURATION_MD.read_text()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    assert start in page and end in page, f"{CONFIGURATION_MD} lost its generated table markers"
    documented = page.split(start, 1)[1].split(end, 1)[0].strip()
    assert documented == markdown_table(SETTINGS), (
        f"docs/configuration.md is out of date; expected:\n{markdown_table()}"
    )
