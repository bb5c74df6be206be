"""App settings from --conf pairs and FETAL_BRAIN_* variables: parsed, checked, and turned into bundle overrides."""

from pathlib import Path

import pytest

from apps.fetal_brain.lib.config import AppConfig


def test_defaults_serve_the_bundle_checkpoint():
    config = AppConfig.from_conf({}, env={})
    bundle = config.bundle("common")
    assert config.resolved_model_path(bundle) == bundle.checkpoint_path
    assert config.allow_remote is False and config.infer_workers == 1
    assert config.max_upload_bytes == 1024 * 2**20
    assert config.train_publish == "if_better"


def test_conf_values_become_bundle_overrides(tmp_path):
    config = AppConfig.from_conf(
        {"pixdim": "4", "patch_size": "32,32,48", "sw_overlap": "0.5", "model_path": str(tmp_path / "m.pt")}, env={}
    )
    bundle = config.bundle("inference")
    assert bundle.pixdim == (4.0, 4.0, 4.0)
    assert bundle.patch_size == (32, 32, 48)
    assert bundle.get("sw_overlap") == 0.5
    assert config.resolved_model_path() == (tmp_path / "m.pt").resolve()


def test_variant_and_env_with_conf_winning():
    env = {"FETAL_BRAIN_VARIANT": "tiny", "FETAL_BRAIN_MAX_UPLOAD_MB": "2", "FETAL_BRAIN_ALLOW_REMOTE": "yes"}
    config = AppConfig.from_conf({"max_upload_mb": "3"}, env=env)
    assert config.variant == "tiny" and config.bundle().patch_size == (32, 32, 32)
    assert config.max_upload_bytes == 3 * 2**20
    assert config.allow_remote is True


def test_bundle_overrides_json():
    config = AppConfig.from_conf({"bundle_overrides": '{"sw_batch_size": 2}'}, env={})
    assert config.bundle().get("sw_batch_size") == 2


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"pixdim": "a"}, "pixdim"),
        ({"pixdim": "1,2"}, "pixdim"),
        ({"patch_size": "30"}, "multiples of 16"),
        ({"patch_size": "31.5"}, "whole"),
        ({"sw_overlap": "1.5"}, "sw_overlap"),
        ({"max_upload_mb": "-1"}, "max_upload_mb"),
        ({"infer_workers": "0"}, "infer_workers"),
        ({"allow_remote": "maybe"}, "allow_remote"),
        ({"train_publish": "sometimes"}, "train_publish"),
        ({"variant": "huge"}, "variant"),
        ({"device": "tpu"}, "device"),
        ({"bundle_overrides": "[1]"}, "JSON object"),
        ({"prepared_cache_mb": "-5"}, "prepared_cache_mb"),
        ({"prepared_cache_mb": "lots"}, "prepared_cache_mb"),
        ({"prepare_on_start": "sometimes"}, "prepare_on_start"),
    ],
)
def test_bad_settings_fail_with_the_key_named(conf, message):
    with pytest.raises(ValueError, match=message):
        AppConfig.from_conf(conf, env={})


def test_unknown_keys_are_logged_not_fatal(caplog):
    AppConfig.from_conf({"pixdimm": "4"}, env={})
    assert "pixdimm" in caplog.text


def test_model_path_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert AppConfig.from_conf({"model_path": "~/m.pt"}, env={}).model_path == Path(tmp_path / "m.pt").resolve()


def test_inference_window_defaults_come_from_the_bundle():
    """ROI/overlap live in the bundle (ROI = the training patch); a patch_size override carries the window along."""
    default = AppConfig.from_conf({}, env={}).bundle("inference")
    assert tuple(default.get("sw_roi_size")) == (48, 48, 48) and default.get("sw_overlap") == 0.25
    assert tuple(default.inferer().roi_size) == (48, 48, 48)
    assert tuple(AppConfig.from_conf({}, env={}).bundle("common").get("sw_roi_size")) == (48, 48, 48)  # = patch
    smaller = AppConfig.from_conf({"pixdim": "4", "patch_size": "32"}, env={}).bundle("inference")
    assert tuple(smaller.inferer().roi_size) == (32, 32, 32)
    tiny = AppConfig.from_conf({"variant": "tiny"}, env={}).bundle("inference")
    assert tuple(tiny.inferer().roi_size) == (32, 32, 32)


def test_prepared_cache_size_in_megabytes_and_zero_turns_it_off():
    assert AppConfig.from_conf({}, env={}).prepared_cache_bytes == 512 * 2**20
    assert AppConfig.from_conf({"prepared_cache_mb": "64"}, env={}).prepared_cache_bytes == 64 * 2**20
    assert AppConfig.from_conf({}, env={"FETAL_BRAIN_PREPARED_CACHE_MB": "0"}).prepared_cache_bytes == 0


def test_studies_are_prepared_at_start_unless_turned_off():
    assert AppConfig.from_conf({}, env={}).prepare_on_start is True
    assert AppConfig.from_conf({"prepare_on_start": "false"}, env={}).prepare_on_start is False


def test_a_bad_environment_value_names_the_variable_and_conf_wins_over_it():
    with pytest.raises(ValueError, match=r"FETAL_BRAIN_INFER_WORKERS: .*'many'"):
        AppConfig.from_conf({}, env={"FETAL_BRAIN_INFER_WORKERS": "many"})
    with pytest.raises(ValueError, match="FETAL_BRAIN_PIXDIM: pixdim needs 1 or 3 values"):
        AppConfig.from_conf({}, env={"FETAL_BRAIN_PIXDIM": "1,2"})
    # the bad environment value is never parsed when --conf gives the key
    assert AppConfig.from_conf({"infer_workers": "2"}, env={"FETAL_BRAIN_INFER_WORKERS": "many"}).infer_workers == 2
    config = AppConfig.from_conf({"pixdim": "4"}, env={"FETAL_BRAIN_PIXDIM": "2,2,2", "FETAL_BRAIN_SW_OVERLAP": "0.5"})
    assert config.bundle_overrides["pixdim"] == [4.0, 4.0, 4.0] and config.bundle_overrides["sw_overlap"] == 0.5


def test_unknown_environment_variables_of_the_prefix_are_logged(caplog):
    AppConfig.from_conf({}, env={"FETAL_BRAIN_PIXDIMM": "4"})
    assert "pixdimm" in caplog.text


def test_every_app_setting_is_documented():
    """docs/configuration.md's app table is generated from AppConfig's fields (regenerate with
    ``markdown_table((AppConfig,))`` from fetalseg.settings)."""
    from fetalseg.paths import REPO_ROOT
    from fetalseg.settings import markdown_table

    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    start, end = "<!-- app-settings-table:start -->", "<!-- app-settings-table:end -->"
    documented = page.split(start, 1)[1].split(end, 1)[0].strip() if start in page else ""
    expected = markdown_table((AppConfig,))
    assert documented == expected, f"docs/configuration.md is out of date; expected:\n{expected}"
