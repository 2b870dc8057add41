"""Crash-only drivers: a core that raises in the middle of an event stops
its server, with a message naming the event and the exception
(trioflow/drivers.py says why)."""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing

from trioflow.config import Config
from trioflow.core.scheduler_events import ClientConnected
from trioflow.core.worker_events import SchedulerLost
from trioflow.errors import DriverStopped
from trioflow.scheduler import Scheduler
from trioflow.sim.network import SimNetwork
from trioflow.worker import Worker

CONFIG = Config(heartbeat_interval=0.5, worker_ttl=3.0, connect_timeout=2.0, restart_timeout=5.0)
SCHEDULER = "sim://scheduler:8786"


class Planted(Exception):
    """The bug planted in a core."""


def raise_on(core, stimulus_id: str) -> None:
    """Make `core.handle` raise on the event with `stimulus_id`, after it
    applied part of it (as a bug halfway through the transitions would)."""
    original = core.handle

    def handle(event):  # named as the core's: the driver finds the event in its frame
        if event.stimulus_id == stimulus_id:
            original(event)
            raise Planted("a bug halfway through the event")
        return original(event)

    core.handle = handle


def run(async_fn):
    return trio.run(async_fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_scheduler_whose_core_raises_stops_and_names_the_event(caplog):
    """The scheduler's serve ends with DriverStopped naming the event type,
    its stimulus id and the exception; the failure is logged CRITICAL."""
    net = SimNetwork(random.Random(1))
    scheduler = Scheduler(host="scheduler", port=8786, config=CONFIG, network=net.for_node("scheduler"))
    raise_on(scheduler.state, "planted-1")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.serve)
            # Posted as a handler that applies it, as the shell's readers do
            # (the event is not among the handler's arguments).
            scheduler._post(lambda: scheduler._apply(ClientConnected("planted-1", "c1")))
            await trio.sleep(60)
            pytest.fail("the scheduler went on serving")

    with caplog.at_level(logging.CRITICAL, logger="trioflow"):
        with pytest.RaisesGroup(DriverStopped) as raised:
            run(main)
    stopped = raised.value.exceptions[0]
    assert str(stopped).startswith(
        "the scheduler at sim://scheduler:8786 stops: handling ClientConnected (stimulus 'planted-1') "
        "raised Planted: a bug halfway through the event"
    ), stopped
    assert isinstance(stopped.__cause__, Planted)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [str(stopped)]


def test_a_worker_whose_core_raises_stops_and_names_the_event(caplog):
    """The worker's serve ends with DriverStopped naming the event and the
    exception (its nanny then starts a new worker)."""
    net = SimNetwork(random.Random(1))
    scheduler = Scheduler(host="scheduler", port=8786, config=CONFIG, network=net.for_node("scheduler"))
    worker = Worker(SCHEDULER, host="worker-0", port=8800, config=CONFIG, network=net.for_node("worker-0"))
    stopped: list[DriverStopped] = []

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.serve)

            async def serve_worker(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    await worker.serve(task_status=task_status)
                except DriverStopped as exc:
                    stopped.append(exc)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_worker)
            while not scheduler.state.workers:
                await trio.sleep(0.01)
            raise_on(worker.state, "planted-2")
            worker._post(lambda: worker._apply(SchedulerLost("planted-2")))
            await trio.sleep(60)
            pytest.fail("the worker went on serving")

    with caplog.at_level(logging.CRITICAL, logger="trioflow"):
        run(main)
    assert len(stopped) == 1, stopped
    assert str(stopped[0]).startswith(
        "worker sim://worker-0:8800 stops: handling SchedulerLost (stimulus 'planted-2') "
        "raised Planted: a bug halfway through the event"
    ), stopped[0]
    assert isinstance(stopped[0].__cause__, Planted)
