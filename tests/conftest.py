"""Shared fixtures: an in-process cluster (real TCP, workers as Trio tasks)."""

import gc
import os

import cloudpickle
import pytest
import trio
from hypothesis import HealthCheck, settings

import tests
import trioflow
import trioflow.comm.auth

# Task functions defined in test modules travel by value, so worker
# subprocesses need not import the test package.
cloudpickle.register_pickle_by_value(tests)

# Hypothesis profiles of the property tests against spec/ (applied by
# tests/properties/conftest.py:profile_settings). Registered here, in the
# conftest pytest loads first, so that ``--hypothesis-profile=thorough``
# works from any directory.
settings.register_profile(
    "fast",
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "thorough",
    max_examples=3000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


SCALE_TESTS_VARIABLE = "TRIOFLOW_SCALE_TESTS"


def pytest_addoption(parser):
    parser.addoption(
        "--scale",
        action="store_true",
        help="also run the tests marked `scale` (minutes each; also TRIOFLOW_SCALE_TESTS=1)",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked `scale` run only when asked: each takes over a minute on
    two cores, more than the whole suite's budget (about 5 minutes on two
    cores) allows."""
    if config.getoption("--scale") or os.environ.get(SCALE_TESTS_VARIABLE) == "1":
        return
    skip = pytest.mark.skip(reason=f"a scale test (minutes): run with --scale or {SCALE_TESTS_VARIABLE}=1")
    for item in items:
        if "scale" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def cluster():
    """A scheduler and two one-thread workers, in this process, over loopback TCP."""
    async with trioflow.AsyncLocalCluster(2, threads_per_worker=1, processes=False) as cluster:
        yield cluster


@pytest.fixture
async def client(cluster):
    async with trioflow.AsyncClient(cluster) as client:
        yield client


async def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll `predicate` until it is true or `timeout` passes (then fail)."""
    with trio.move_on_after(timeout):
        while not predicate():
            gc.collect()
            await trio.sleep(interval)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


# Every process of the test session authenticates as a user's would: with a
# token in TRIOFLOW_TOKEN, made here for this session (subprocesses inherit
# it). Tests of what happens without one remove it themselves.
os.environ["TRIOFLOW_TOKEN"] = trioflow.comm.auth.Credentials.generate().cluster_token()
