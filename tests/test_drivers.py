"""The driver (trioflow/drivers.py): handlers run one at a time in the order
handed over; those already waiting run back to back, within a bound of
handlers and of the loop's clock; one handed over while the driver is idle
runs at once; a handler that raises stops the driver either way."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import trio
import trio.testing

from trioflow import drivers
from trioflow.drivers import Driver
from trioflow.errors import DriverStopped

logger = logging.getLogger("tests.drivers")


class _Steps(trio.abc.Instrument):
    """Logs each step of every task: a step runs from one checkpoint to the next."""

    def __init__(self, log: list):
        self.log = log

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.log.append(("step", task))


async def drive(n_handlers: int, *, handler_extra=None) -> list[int]:
    """Post `n_handlers` handlers, run the driver until it has run them all;
    how many handlers each of the driver's steps ran, in order
    (a step with none is left out)."""
    log: list = []
    driver = Driver(lambda: "the test's server", logger)
    all_ran = trio.Event()
    for i in range(n_handlers):

        def handler(i=i):
            log.append((f"h{i}", trio.lowlevel.current_task()))
            if handler_extra is not None:
                handler_extra(i)
            if i == n_handlers - 1:
                all_ran.set()

        driver.post(handler)
    instrument = _Steps(log)
    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            await all_ran.wait()
            nursery.cancel_scope.cancel()
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

    driver = Driver(lambda: "the test's server", logger)
    for i in range(8):
        driver.post(handler, i)
    with pytest.raises(DriverStopped, match="running 'handler' raised ValueError: planted") as caught:
        await driver.run()
    assert ran == [0, 1, 2]
    assert isinstance(caught.value.__cause__, ValueError)
    driver.post(handler, 9)
    driver.run_or_post(handler, 10)
    assert ran == [0, 1, 2]  # stopped: nothing more runs


async def test_a_handler_handed_over_while_the_driver_is_idle_runs_at_once():
    driver = Driver(lambda: "the test's server", logger)
    ran: list[tuple[str, trio.lowlevel.Task]] = []
    driver.run_or_post(lambda: ran.append(("h0", trio.lowlevel.current_task())))
    assert ran == [("h0", trio.lowlevel.current_task())]  # here, before it returned


async def test_a_handler_handed_over_behind_queued_ones_waits_its_turn():
    """Run at once, it would overtake the one posted before it."""
    driver = Driver(lambda: "the test's server", logger)
    ran: list[str] = []
    driver.post(ran.append, "h0")
    driver.run_or_post(ran.append, "h1")
    assert ran == []
    await _run_until(driver, lambda: len(ran) == 2)
    assert ran == ["h0", "h1"]
    driver.run_or_post(ran.append, "h2")  # idle again: at once
    assert ran == ["h0", "h1", "h2"]


async def test_a_handler_that_hands_over_another_never_nests_it():
    """The second runs after the first has finished, in the driver's task."""
    driver = Driver(lambda: "the test's server", logger)
    log: list[tuple[str, str]] = []

    def first() -> None:
        log.append(("first", "begins"))
        driver.run_or_post(lambda: log.append(("second", trio.lowlevel.current_task().name)))
        log.append(("first", "ends"))

    driver.run_or_post(first)
    assert log == [("first", "begins"), ("first", "ends")]
    await _run_until(driver, lambda: len(log) == 3)
    assert log[2][0] == "second" and log[2][1].endswith("Driver.run")


async def test_a_handler_run_at_once_that_raises_stops_the_driver():
    """The caller carries on; the driver's task raises, as it would have had
    it run the handler, and nothing handed over since runs."""
    driver = Driver(lambda: "the test's server", logger)
    ran: list[int] = []

    def handler(i: int) -> None:
        if i == 1:
            raise ValueError("planted")
        ran.append(i)

    driver.run_or_post(handler, 0)
    driver.run_or_post(handler, 1)  # does not raise here
    driver.run_or_post(handler, 2)
    driver.post(handler, 3)
    with pytest.raises(DriverStopped, match="running 'handler' raised ValueError: planted") as caught:
        with trio.fail_after(5):
            await driver.run()
    assert isinstance(caught.value.__cause__, ValueError)
    assert ran == [0]


async def _run_until(driver: Driver, done) -> None:
    """Run the driver's task until `done()` (checked after each step)."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            while not done():
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()


async def test_an_idle_driver_holds_no_reference_to_the_last_handlers_arguments():
    """A handler's arguments can be a value the core drops later; an idle
    driver (whose next handlers may all run at once, elsewhere) must not
    keep its memory taken."""

    class Value:
        pass

    driver = Driver(lambda: "the test's server", logger)
    value = Value()
    dropped = weakref.ref(value)
    ran: list[str] = []
    driver.post(lambda v: ran.append("h0"), value)
    del value
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        with trio.fail_after(5):
            while not ran:
                await trio.lowlevel.checkpoint()
            await trio.testing.wait_all_tasks_blocked()  # the driver waits for more
        gc.collect()
        assert dropped() is None, "the idle driver still holds the last handler's argument"
        nursery.cancel_scope.cancel()
