"""The driver's bursts: handlers already waiting run back to back, within
a bound of handlers and of the loop's clock (trioflow/drivers.py)."""

from __future__ import annotations

import logging
import math

import pytest
import trio
import trio.testing

from trioflow import drivers
from trioflow.drivers import run_driver
from trioflow.errors import DriverStopped

logger = logging.getLogger("tests.drivers")


class _Steps(trio.abc.Instrument):
    """Logs each step of every task: a step runs from one checkpoint to the next."""

    def __init__(self, log: list):
        self.log = log

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.log.append(("step", task))


async def drive(n_handlers: int, *, handler_extra=None) -> list[int]:
    """Post `n_handlers` handlers, run the driver until its inbox is empty
    and closed; how many handlers each of the driver's steps ran, in order
    (a step with none is left out)."""
    log: list = []
    send, inbox = trio.open_memory_channel(math.inf)
    for i in range(n_handlers):

        def handler(i=i):
            log.append((f"h{i}", trio.lowlevel.current_task()))
            if handler_extra is not None:
                handler_extra(i)

        send.send_nowait((handler, ()))
    send.close()
    instrument = _Steps(log)
    trio.lowlevel.add_instrument(instrument)
    try:
        await run_driver(inbox, lambda: "the test's server", logger)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    handled = [entry for entry, task in log if entry != "step"]
    assert handled == [f"h{i}" for i in range(n_handlers)]  # all of them, in order
    driver = next(task for entry, task in reversed(log) if entry != "step")
    runs, current = [], 0
    for entry, task in log:
        if entry == "step" and task is driver:
            if current:
                runs.append(current)
            current = 0
        elif entry != "step":
            current += 1
    return runs + ([current] if current else [])


@pytest.fixture
def no_time_bound(monkeypatch):
    """A burst bounded by its count only (a loaded machine may stall 2 ms)."""
    monkeypatch.setattr(drivers, "BURST_SECONDS", 60.0)


async def test_waiting_handlers_run_back_to_back_in_order(no_time_bound):
    assert await drive(10) == [10]


async def test_a_burst_is_bounded_by_a_number_of_handlers(no_time_bound, monkeypatch):
    monkeypatch.setattr(drivers, "BURST_HANDLERS", 4)
    assert await drive(23) == [5, 5, 5, 5, 3]


async def test_without_bursts_the_driver_yields_after_every_handler(monkeypatch):
    monkeypatch.setattr(drivers, "BURST_HANDLERS", 0)
    assert await drive(6) == [1] * 6


async def test_a_burst_is_bounded_by_the_loops_clock(mock_clock, monkeypatch):
    """Each handler takes 1 ms of the loop's clock: after the first, a burst
    starts handlers until 2 ms have passed, so three run back to back."""
    monkeypatch.setattr(drivers, "BURST_SECONDS", 0.002)
    assert await drive(9, handler_extra=lambda i: mock_clock.jump(0.001)) == [3, 3, 3]


async def test_a_handler_that_raises_in_a_burst_stops_the_driver_there():
    ran: list[int] = []

    def handler(i: int) -> None:
        if i == 3:
            raise ValueError("planted")
        ran.append(i)

    send, inbox = trio.open_memory_channel(math.inf)
    for i in range(8):
        send.send_nowait((handler, (i,)))
    with pytest.raises(DriverStopped, match="running 'handler' raised ValueError: planted") as caught:
        await run_driver(inbox, lambda: "the test's server", logger)
    assert ran == [0, 1, 2]
    assert isinstance(caught.value.__cause__, ValueError)
