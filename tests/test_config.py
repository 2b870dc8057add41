"""Config: defaults, TRIOFLOW_* variables, overrides, and clear errors."""

import math

import pytest

from trioflow import Config, ConfigError


def test_defaults_match_the_design():
    """The defaults of design.md §1: heartbeat 0.5 s, ttl 3 s, 3 allowed failures."""
    config = Config()
    assert (config.heartbeat_interval, config.worker_ttl, config.allowed_failures) == (0.5, 3.0, 3)
    assert config.scheduler_timeout == math.inf


def test_environment_then_overrides():
    """TRIOFLOW_* variables override defaults; keyword overrides win over both."""
    env = {"TRIOFLOW_WORKER_TTL": "7.5", "TRIOFLOW_ALLOWED_FAILURES": "5", "TRIOFLOW_UNRELATED": "x"}
    config = Config.from_env(env)
    assert (config.worker_ttl, config.allowed_failures) == (7.5, 5)
    assert Config.from_env(env, worker_ttl=1.0).worker_ttl == 1.0


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TRIOFLOW_WORKER_TTL": "soon"}, "TRIOFLOW_WORKER_TTL='soon' is not a number"),
        ({"TRIOFLOW_ALLOWED_FAILURES": "2.5"}, "TRIOFLOW_ALLOWED_FAILURES='2.5' is not an integer"),
        ({"TRIOFLOW_HEARTBEAT_INTERVAL": "-1"}, "heartbeat_interval must be positive"),
        ({"TRIOFLOW_WORKER_TTL": "nan"}, "worker_ttl must not be NaN"),
    ],
)
def test_bad_environment_values_name_the_variable(env, message):
    """A malformed variable raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Config.from_env(env)


def test_unknown_override_and_wrong_types_are_refused():
    """Overrides must name a field and have the field's type."""
    with pytest.raises(ConfigError, match="no field 'worker_tll'"):
        Config.from_env({}, worker_tll=3)
    with pytest.raises(ConfigError, match="allowed_failures must be an int"):
        Config(allowed_failures="3")
    with pytest.raises(ConfigError, match="reconnect_backoff_min must not exceed"):
        Config(reconnect_backoff_min=5, reconnect_backoff_max=1)
