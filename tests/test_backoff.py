"""The waits of workers and clients reconnecting and of nannies restarting."""

import random

import pytest

from trioflow.backoff import Backoff


def test_steps_double_up_to_the_cap_and_each_wait_is_in_the_upper_half():
    backoff = Backoff(0.05, 2.0, random.Random(1))
    steps = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for step in steps:
        pause = backoff.next()
        assert step / 2 <= pause <= step


def test_reset_starts_again_from_the_minimum():
    backoff = Backoff(0.05, 2.0, random.Random(2))
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= 0.05


def test_waits_are_jittered_and_replayable():
    """Peers that failed together do not retry together; a seed replays."""
    draws = [[Backoff(1.0, 1.0, random.Random(seed)).next() for seed in range(20)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) == 20


@pytest.mark.parametrize(("minimum", "maximum"), [(0, 1), (-1, 1), (2, 1)])
def test_nonsense_bounds_are_refused(minimum, maximum):
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(minimum, maximum, random.Random())
