"""Job config: shipped configs are valid, typos and silently-weak privacy settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvflare_jobs.config import (
    ENV_DATA_ROOT,
    ENV_SITE_DATA,
    ConfigError,
    JobConfig,
    load_config,
    resolve_site_data,
)

JOB_DIR = Path(__file__).resolve().parents[2] / "nvflare_jobs" / "fetal_brain"
SHIPPED = sorted([JOB_DIR / "config.json", *(JOB_DIR / "configs").glob("*.json")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.sites == ("site-1", "site-2", "site-3")
    assert 1 <= cfg.min_clients <= len(cfg.sites)


def test_defaults_are_fedavg_on_three_sites() -> None:
    cfg = JobConfig.from_dict({})
    assert (cfg.algorithm, cfg.num_rounds, cfg.min_clients) == ("fedavg", 5, 3)
    assert cfg.filters == () and cfg.dp_sgd is None and cfg.tracking == "tensorboard" and cfg.cross_site_eval


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_round": 3}, "unknown key"),
        ({"algorithm": "fedsgd"}, "algorithm.name"),
        ({"algorithm": {"name": "fedavg", "mu": 0.1}}, "only applies to fedprox"),
        ({"min_clients": 4}, "exceeds"),
        ({"sites": ["a", "a"]}, "duplicates"),
        ({"privacy": {"filters": [{"type": "percentile", "gamma": 0}]}}, "gamma"),
        ({"privacy": {"filters": [{"type": "percentile", "percentile": 120}]}}, "percentile"),
        ({"privacy": {"filters": [{"type": "percentile", "percentil": 10}]}}, "unknown key"),
        ({"privacy": {"filters": [{"type": "svt", "epsilon": 0.1}]}}, "epsilon_release"),
        ({"privacy": {"filters": [{"type": "class", "path": "NoDots"}]}}, "class path"),
        ({"privacy": {"filters": [{"type": "percentile", "sites": ["site-9"]}]}}, "site-9"),
        ({"privacy": {"sites": {"site-9": {"dp_sgd": {}}}}}, "site-9"),
        ({"algorithm": {"name": "fedprox"}, "privacy": {"dp_sgd": {"noise_multiplier": 1.0}}}, "fedprox"),
        # DP-SGD settings are checked when the config is read, as the sites will build them (not first at a site)
        ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "accountant": "moments"}}}, r"privacy\.dp_sgd: accountant"),
        ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "ema_decay": 1.0}}}, r"privacy\.dp_sgd: .*ema_decay"),
        ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 0}}}, r"privacy\.dp_sgd: .*max_grad_norm"),
        ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "delta": 0}}}, r"privacy\.dp_sgd: delta must be in"),
        (
            {"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "clip": 1.0}}},
            r"privacy\.dp_sgd: unknown DP-SGD config keys",
        ),
        ({"privacy": {"dp_sgd": {"target_epsilon": 8, "noise_multiplier": 1.0}}}, r"privacy\.dp_sgd: give exactly one"),
        ({"privacy": {"sites": {"site-2": {"dp_sgd": {"target_epsilon": -1}}}}}, r"privacy\.sites\.site-2\.dp_sgd"),
        ({"server": {"max_update_norm": -1}}, "max_update_norm"),
        ({"training": {"local_epochs": 0}}, "local_epochs"),
        ({"tracking": "mlflow"}, "tracking"),
        ({"initial_checkpoint": ""}, "initial_checkpoint"),
        ({"initial_checkpoint": {"path": "x.pt"}}, "initial_checkpoint"),
        ({"server": {"aggregation": "median"}}, r"server\.aggregation must be an object"),
        ({"server": {"aggregation": {"method": "krum"}}}, r"server\.aggregation\.method"),
        ({"server": {"aggregation": {"metod": "median"}}}, "unknown key"),
        ({"server": {"aggregation": {"method": "trimmed_mean"}}}, r"trim_fraction must be set"),
        (
            {"server": {"aggregation": {"method": "trimmed_mean", "trim_fraction": 0.5}}},
            r"trim_fraction must be < 0\.5",
        ),
        ({"server": {"aggregation": {"method": "trimmed_mean", "trim_fraction": -0.1}}}, r"trim_fraction must be >= 0"),
        ({"server": {"aggregation": {"method": "trimmed_mean", "trim_fraction": 0.3}}}, r"0 sites per side.*0\.3334"),
        ({"server": {"aggregation": {"method": "median", "trim_fraction": 0.2}}}, "only applies to trimmed_mean"),
        ({"server": {"aggregation": {"clip_update_norm": 0}}}, r"clip_update_norm must be > 0"),
        ({"server": {"aggregation": {"clip_update_norm": "5"}}}, r"clip_update_norm must be a finite number"),
        ({"server": {"aggregation": {"clip_update_norm": 1000.0}}}, r"clip_update_norm=1000 must be below"),
    ],
)
def test_bad_configs_are_refused_with_the_key_named(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict(changes)


def test_per_site_filters_and_dp_sgd() -> None:
    cfg = JobConfig.from_dict(
        {
            "privacy": {
                "filters": [{"type": "percentile", "percentile": 20, "gamma": 0.05}],
                "dp_sgd": {"noise_multiplier": 1.0},
                "sites": {
                    "site-2": {
                        "filters": [{"type": "svt", "epsilon_release": 1.0}],
                        "dp_sgd": {"noise_multiplier": 2.0},
                    },
                    "site-3": {"dp_sgd": None},
                },
            }
        }
    )
    assert [f.type for f in cfg.filters_for("site-1")] == ["percentile"]
    assert [f.type for f in cfg.filters_for("site-2")] == ["percentile", "svt"]
    assert cfg.filters_for("site-2")[0].args == {"percentile": 20, "gamma": 0.05}
    assert cfg.dp_sgd_for("site-1") == {"noise_multiplier": 1.0}
    assert cfg.dp_sgd_for("site-2") == {"noise_multiplier": 2.0}
    assert cfg.dp_sgd_for("site-3") is None


def test_one_line_change_revalidates() -> None:
    cfg = JobConfig.from_dict({"num_rounds": 3})
    changed = cfg.with_changes(algorithm={"name": "fedprox", "mu": 0.1})
    assert (changed.algorithm, changed.fedprox_mu, changed.num_rounds) == ("fedprox", 0.1, 3)
    with pytest.raises(ConfigError):
        cfg.with_changes(num_rounds=0)


def test_yaml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("algorithm: fedopt\nnum_rounds: 2\nmin_clients: 2\n")
    assert load_config(tmp_path / "job.yaml").algorithm == "fedopt"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"rounds": 2}))
    with pytest.raises(ConfigError, match=r"typo.json.*rounds"):
        load_config(tmp_path / "typo.json")


def test_site_data_resolution_order(tmp_path: Path) -> None:
    cfg = JobConfig.from_dict({"data": {"root": "/from/config"}})
    assert resolve_site_data(cfg, "site-2", environ={}) == Path("/from/config/site-2")
    assert resolve_site_data(cfg, "site-2", environ={ENV_DATA_ROOT: "/env/root"}) == Path("/env/root/site-2")
    env = {ENV_DATA_ROOT: "/env/root", ENV_SITE_DATA: str(tmp_path)}
    assert resolve_site_data(cfg, "site-2", environ=env) == tmp_path
    with pytest.raises(ConfigError, match=ENV_SITE_DATA):
        resolve_site_data(JobConfig.from_dict({}), "site-1", environ={})


def test_the_old_val_fraction_is_accepted_only_where_it_means_the_shared_split() -> None:
    from fetalseg.baseline import TEST_FRACTION

    assert JobConfig.from_dict({"data": {"val_fraction": TEST_FRACTION}}).split_seed == 0  # old default: same split
    assert JobConfig.from_dict({"data": {"split_seed": 3}}).split_seed == 3
    for value in (0.3, 0.0, "0.25", True):
        with pytest.raises(ConfigError, match=r"data\.val_fraction.*no longer used.*split_site"):
            JobConfig.from_dict({"data": {"val_fraction": value}})


def test_aggregation_defaults_to_the_plain_mean_and_is_read_when_given() -> None:
    cfg = JobConfig.from_dict({})
    assert (cfg.aggregation_method, cfg.trim_fraction, cfg.clip_update_norm) == ("mean", 0.0, None)
    assert not cfg.robust_aggregation
    agg = {"method": "trimmed_mean", "trim_fraction": 0.2, "clip_update_norm": 5}
    cfg = JobConfig.from_dict({"sites": [f"site-{i}" for i in range(10)], "server": {"aggregation": agg}})
    assert (cfg.aggregation_method, cfg.trim_fraction, cfg.clip_update_norm) == ("trimmed_mean", 0.2, 5.0)
    assert (
        cfg.robust_aggregation
        and JobConfig.from_dict({"server": {"aggregation": {"method": "median"}}}).robust_aggregation
    )
    assert JobConfig.from_dict({"server": {"aggregation": {"clip_update_norm": 1.0}}}).robust_aggregation
    # 1/3 of 3 sites trims one per side; the same fraction at 10 sites trims 3
    assert JobConfig.from_dict({"server": {"aggregation": {"method": "trimmed_mean", "trim_fraction": 1 / 3}}})
