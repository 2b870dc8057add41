"""One order, three names: the table in `trioflow.protocol.ORDERS` maps
each message of the scheduler's core to its wire op and to the event the
receiving worker's core hears, and it is complete."""

from __future__ import annotations

import dataclasses
import inspect

from trioflow import protocol, worker
from trioflow.comm import messages as m
from trioflow.core import scheduler_events, worker_events


def _core_messages() -> set[str]:
    return {
        name
        for name, cls in vars(scheduler_events).items()
        if inspect.isclass(cls)
        and issubclass(cls, scheduler_events.SchedulerMessage)
        and cls is not scheduler_events.SchedulerMessage
        and dataclasses.is_dataclass(cls)
    }


def _wire_ops(channel: str) -> dict[str, type]:
    return {
        cls.OP: cls
        for cls in vars(m).values()
        if inspect.isclass(cls) and issubclass(cls, m.Message) and cls.OP and channel in cls.CHANNELS
    }


def test_every_message_of_the_scheduler_core_has_its_names():
    """Each message the core can emit is in ORDERS or NOT_ON_THE_WIRE, once."""
    listed = [row[0] for row in protocol.ORDERS] + list(protocol.NOT_ON_THE_WIRE)
    assert sorted(listed) == sorted(_core_messages())


def test_every_op_named_exists_on_the_channel_to_its_receiver():
    """The wire ops of the table exist, going from the scheduler to whoever hears them."""
    to = {"worker": _wire_ops(m.SCHEDULER_TO_WORKER), "client": _wire_ops(m.SCHEDULER_TO_CLIENT)}
    missing = [(op, who) for _, ops, who, _ in protocol.ORDERS for op in ops if op not in to[who]]
    assert missing == []


def test_each_op_to_a_worker_becomes_the_event_named():
    """The worker's handler of each op applies the event the table names,
    and that event is one of the worker core's."""
    for _, ops, who, event in protocol.ORDERS:
        if who != "worker":
            continue
        assert inspect.isclass(getattr(worker_events, event, None)), event
        for op in ops:
            handler = getattr(worker.Worker, f"_on_{op}")
            assert f"{event}(" in inspect.getsource(handler), (op, event)


def test_every_order_the_scheduler_sends_a_worker_is_in_the_table_or_not_a_core_order():
    """Ops to a worker that no core message orders are the shell's own
    (exchanges, uploads, function frees): listed here, so a new order of the
    core cannot slip past the table."""
    ordered = {op for _, ops, who, _ in protocol.ORDERS if who == "worker" for op in ops}
    shells_own = {
        "free_functions", "put_data", "run", "upload_file", "close", "heartbeat_ack", "welcome", "invalid", "reply",
        "refused",
    }
    assert set(_wire_ops(m.SCHEDULER_TO_WORKER)) - ordered <= shells_own
