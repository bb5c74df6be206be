"""``privacy.metrics`` in the job config: checked before anything runs, like every other key."""

from __future__ import annotations

import pytest

from nvflare_jobs.config import ConfigError, JobConfig


def _config(metrics) -> JobConfig:
    return JobConfig.from_dict({"privacy": {"dp_sgd": {"noise_multiplier": 1.0}, "metrics": metrics}})


def test_a_metrics_noise_multiplier_is_accepted_and_travels_with_the_config() -> None:
    assert _config({"noise_multiplier": 20.0}).raw["privacy"]["metrics"] == {"noise_multiplier": 20.0}


@pytest.mark.parametrize(
    "metrics", [{"noise_multiplier": 0}, {"noise_multiplier": -1.0}, {"noise_multiplier": "20"}, {"sigma": 20.0}, 3]
)
def test_a_bad_metrics_policy_is_a_config_error(metrics) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.metrics"):
        _config(metrics)
