"""Config: defaults, TRIOFLOW_* variables, overrides, and clear errors."""

import math
import re

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
    with pytest.raises(ConfigError, match="reconnect_backoff_min .* must not exceed"):
        Config(reconnect_backoff_min=5, reconnect_backoff_max=1)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(heartbeat_interval=3.0, worker_ttl=3.0),
         r"Config.heartbeat_interval \(3 s\) must be less than Config.worker_ttl \(3 s\): .*declare it dead"),
        (dict(heartbeat_interval=5.0, worker_ttl=2.0, scheduler_ttl=10.0),
         r"Config.heartbeat_interval \(5 s\) must be less than Config.worker_ttl \(2 s\)"),
        (dict(heartbeat_interval=1.5, scheduler_ttl=1.0),
         r"Config.heartbeat_interval \(1.5 s\) must be less than Config.scheduler_ttl \(1 s\): .*healthy scheduler"),
        (dict(reconnect_backoff_min=5, reconnect_backoff_max=1),
         r"Config.reconnect_backoff_min \(5 s\) must not exceed Config.reconnect_backoff_max \(1 s\)"),
    ],
)
def test_fields_that_must_agree_are_refused_together(fields, message):
    """A heartbeat no shorter than a ttl (or backoff bounds upside down) is refused, naming both fields and values."""
    with pytest.raises(ConfigError, match=message):
        Config(**fields)


def test_rules_between_fields_hold_on_every_path_and_just_inside_the_bounds():
    """replace() and TRIOFLOW_* variables are checked too; a heartbeat just under both ttls is accepted."""
    with pytest.raises(ConfigError, match=r"heartbeat_interval \(0.5 s\) .*worker_ttl \(0.5 s\)"):
        Config().replace(worker_ttl=0.5)
    with pytest.raises(ConfigError, match=r"heartbeat_interval \(4 s\) .*scheduler_ttl \(3 s\)"):
        Config.from_env({"TRIOFLOW_HEARTBEAT_INTERVAL": "4", "TRIOFLOW_WORKER_TTL": "9"})
    config = Config(heartbeat_interval=0.99, worker_ttl=1.0, scheduler_ttl=1.0)
    assert config.heartbeat_interval < config.worker_ttl
    assert Config(worker_ttl=math.inf, scheduler_ttl=math.inf).worker_ttl == math.inf


def test_dashboard_fields_from_the_environment():
    """The dashboard is off by default; its port, host and token come from TRIOFLOW_* like every field."""
    default = Config()
    assert (default.dashboard_port, default.dashboard_host, default.dashboard_token) == (None, "127.0.0.1", "")
    env = {"TRIOFLOW_DASHBOARD_PORT": "8787", "TRIOFLOW_DASHBOARD_HOST": "::1", "TRIOFLOW_DASHBOARD_TOKEN": "a b"}
    config = Config.from_env(env)
    assert (config.dashboard_port, config.dashboard_host, config.dashboard_token) == (8787, "::1", "a b")
    assert Config.from_env({"TRIOFLOW_DASHBOARD_PORT": "none"}).dashboard_port is None
    assert Config.from_env(config.to_env()) == config  # how a nanny hands its config to a worker
    assert Config.from_env(default.to_env()) == default


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TRIOFLOW_DASHBOARD_PORT": "http"}, "TRIOFLOW_DASHBOARD_PORT='http' is not an integer (or 'none')"),
        ({"TRIOFLOW_DASHBOARD_PORT": "65536"}, "dashboard_port must be a port number between 0 and 65535"),
        ({"TRIOFLOW_DASHBOARD_HOST": ""}, "dashboard_host must name an interface"),
    ],
)
def test_bad_dashboard_values_are_refused(env, message):
    """A dashboard port that is not a port, or an empty host, raises ConfigError naming the field."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_env(env)
    with pytest.raises(ConfigError, match="dashboard_token must be a string"):
        Config(dashboard_token=None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4GB", 4 * 10**9), ("4g", 4 * 10**9), ("4G", 4 * 10**9), ("4GiB", 2**32), ("4 gib", 2**32),
        ("512MiB", 512 * 2**20), ("5kB", 5000), ("5.4 kB", 5400), ("1kiB", 1024), ("1e6", 10**6),
        ("1e6 kB", 10**9), ("MB", 10**6), ("100", 100), ("0", 0), (123, 123),
    ],
)
def test_byte_sizes_parse_as_dask_parses_them(text, expected):
    """parse_bytes follows dask.utils.parse_bytes: 4GB = 4g = 4e9, 4GiB = 2**32."""
    from trioflow.config import parse_bytes

    assert parse_bytes(text) == expected


def test_byte_sizes_agree_with_dask_itself():
    """The same answers as dask's own parse_bytes, for the units both know."""
    from dask.utils import parse_bytes as dask_parse_bytes

    from trioflow.config import parse_bytes

    for text in ["4GB", "4g", "4G", "4GiB", "512MiB", "5kB", "5.4 kB", "1kiB", "1e6 kB", "MB", "7 tb", "3 PiB"]:
        assert parse_bytes(text) == dask_parse_bytes(text), text


@pytest.mark.parametrize("text", ["5 foos", "lots", "-1GB", "", "1e400 GB"])
def test_bad_byte_sizes_are_refused_by_text(text):
    """Something that is not a size raises ValueError quoting it."""
    from trioflow.config import parse_bytes

    with pytest.raises(ValueError, match="byte size"):
        parse_bytes(text)


def test_byte_size_fields_take_units_from_the_environment():
    """TRIOFLOW_MAX_FRAME_BYTES=256MiB is 256 * 2**20 bytes."""
    assert Config.from_env({"TRIOFLOW_MAX_FRAME_BYTES": "256MiB"}).max_frame_bytes == 256 * 2**20
    with pytest.raises(ConfigError, match="TRIOFLOW_MAX_FRAME_BYTES='lots'"):
        Config.from_env({"TRIOFLOW_MAX_FRAME_BYTES": "lots"})


def test_a_misspelt_variable_gets_a_warning_naming_the_closest_one():
    """TRIOFLOW_WORKER_TLL warns "did you mean TRIOFLOW_WORKER_TTL?"; unrelated ones do not."""
    with pytest.warns(UserWarning, match="TRIOFLOW_WORKER_TLL is not a trioflow setting.*did you mean TRIOFLOW_WORKER_TTL"):
        config = Config.from_env({"TRIOFLOW_WORKER_TLL": "9"})
    assert config.worker_ttl == Config().worker_ttl
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config.from_env({"TRIOFLOW_FUZZ_EXAMPLES": "5000", "TRIOFLOW_UNRELATED": "x"})


def test_cli_byte_size_flags_take_units():
    """--max-frame-bytes 1GiB and --resources GPU=2 parse on the command line."""
    from trioflow.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["worker", "tcp://127.0.0.1:1", "--max-frame-bytes", "1GiB", "--resources", "GPU=2"]
    )
    assert config_from_args(args).max_frame_bytes == 2**30
    assert args.resources == {"GPU": 2.0}


def test_the_scheduler_core_keeps_no_default_of_its_own_that_differs_from_config():
    """The core's parameters named like Config fields default to Config's values; worker_saturation has no default."""
    import dataclasses
    import inspect

    from trioflow.core.scheduler_state import SchedulerState

    config_defaults = {field.name: field.default for field in dataclasses.fields(Config)}
    # The core names its durations with their unit: recovery_grace_s is Config.recovery_grace.
    shared = {
        name.removesuffix("_s"): parameter.default
        for name, parameter in inspect.signature(SchedulerState).parameters.items()
        if name.removesuffix("_s") in config_defaults
    }
    assert set(shared) == {
        "allowed_failures", "worker_saturation", "work_stealing", "bandwidth", "recovery_grace", "orphan_timeout"
    }
    assert shared.pop("worker_saturation") is inspect.Parameter.empty
    assert shared == {name: config_defaults[name] for name in shared}


def test_the_scheduler_builds_its_core_from_its_config():
    """Scheduler(config=...) hands every scheduling field of its Config to its core."""
    from trioflow.scheduler import Scheduler

    config = Config(
        auth=False, allowed_failures=5, worker_saturation=7.5, work_stealing=False, bandwidth=1e6,
        recovery_grace=1.5, orphan_timeout=30.0,
    )
    state = Scheduler(config=config).state
    assert (
        state.allowed_failures, state.worker_saturation, state.balancer.enabled, state.balancer.bandwidth,
        state.recovery_grace_s, state.orphan_timeout_s,
    ) == (5, 7.5, False, 1e6, 1.5, 30.0)
