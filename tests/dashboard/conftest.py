"""Fixtures of the dashboard tests: real processes come from the cluster tests' `spawn`."""

from tests.cluster.conftest import spawn  # noqa: F401 - a fixture, used by name
