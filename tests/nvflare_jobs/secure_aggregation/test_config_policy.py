"""Secure aggregation's config line and site policy, without starting NVFlare: bad parameters fail closed before any
training, a policy requiring secure aggregation refuses a plain job."""

from __future__ import annotations

import pytest

from nvflare_jobs.config import ConfigError, JobConfig
from nvflare_jobs.site_policy import PolicyViolationError, RequireSecureAggregation, check_secure_aggregation
from tests.nvflare_jobs.conftest import tiny_config


def cfg(tmp_path, **server) -> JobConfig:
    return JobConfig.from_dict(tiny_config(tmp_path, server=server))


def test_the_one_config_line(tmp_path) -> None:
    c = cfg(tmp_path, secure_aggregation={"enabled": True, "threshold": 3})
    assert c.secure_aggregation and c.secagg_threshold == 3 and c.secagg_frac_bits == 16
    assert cfg(tmp_path, secure_aggregation={"enabled": True}).secagg_threshold == 2  # majority of 3
    assert not cfg(tmp_path).secure_aggregation
    assert not cfg(tmp_path, secure_aggregation={"enabled": False, "threshold": 99}).secure_aggregation


@pytest.mark.parametrize(
    ("sa", "extra", "message"),
    [
        ({"enabled": True, "threshold": 4}, {}, "threshold 4 is above the 3 sites"),
        ({"enabled": True, "threshold": 1}, {}, "strict majority"),
        ({"enabled": True, "threshold": 2.0}, {}, "must be an integer"),
        ({"enabled": "yes"}, {}, "enabled must be true or false"),
        ({"enabled": True, "treshold": 2}, {}, "unknown key"),
        ({"enabled": True, "frac_bits": 40}, {}, "frac_bits"),
        ({"enabled": True}, {"aggregation": {"method": "median"}}, r"cannot be combined with server\.aggregation"),
        ({"enabled": True}, {"aggregation": {"clip_update_norm": 5.0}}, r"cannot be combined with server\.aggregation"),
    ],
)
def test_bad_parameters_are_refused_before_training(tmp_path, sa, extra, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(tmp_path, secure_aggregation=sa, **extra)


def test_sparse_sharing_is_refused_with_secure_aggregation(tmp_path) -> None:
    d = tiny_config(tmp_path, server={"secure_aggregation": {"enabled": True}})
    d["privacy"]["filters"] = [{"type": "sparse_percentile", "percentile": 90, "gamma": 0.01}]
    with pytest.raises(ConfigError, match="sparse_percentile"):
        JobConfig.from_dict(d)


def test_a_policy_requiring_secure_aggregation_refuses_a_plain_job(tmp_path) -> None:
    with pytest.raises(PolicyViolationError, match=r"does not enable server\.secure_aggregation"):
        check_secure_aggregation(cfg(tmp_path))
    with pytest.raises(PolicyViolationError, match="no fetal-fl job config"):
        check_secure_aggregation(None)
    secure = cfg(tmp_path, secure_aggregation={"enabled": True, "threshold": 2})
    check_secure_aggregation(secure)
    with pytest.raises(PolicyViolationError, match="below this site's minimum 3"):
        check_secure_aggregation(secure, min_threshold=3)
    with pytest.raises(ValueError, match="min_threshold"):
        RequireSecureAggregation(min_threshold=1)
