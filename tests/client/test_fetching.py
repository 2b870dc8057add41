"""The fetcher (trioflow/fetching.py) against fake workers and a fake scheduler."""

from __future__ import annotations

import trio

from trioflow.comm import dumps
from trioflow.comm import messages as m
from trioflow.core import client_state as cs
from trioflow.errors import CommClosedError
from trioflow.fetching import Fetcher

HUNG, EMPTY, GOOD = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.3:1"
PAUSE_S = 0.5


class Kept:
    dependencies = ()
    function_id = None


class FakeClient:
    """A client with a real core, workers that answer as told, and a scheduler
    whose `who_has` answers from `holders`."""

    def __init__(self, holders: dict[str, list[str]]):
        self.core = cs.ClientState()
        self.sent: list[cs.ClientOutput] = []
        self.holders = holders
        self.calls: list[tuple[float, str]] = []  # (trio time, worker) of each get_data
        self._ids = iter(range(10**6))
        self._pool = self
        self.core.handle(cs.SchedulerConnected("connected", False))

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._ids)}"

    def _apply(self, event: cs.ClientEvent) -> None:
        self.sent.extend(o for o in self.core.handle(event) if not isinstance(o, cs.FutureDone))

    async def _connection(self, timeout):
        return self

    async def _call_scheduler(self, message):
        assert isinstance(message, m.WhoHas)
        return m.WhoHasReply(who_has={k: self.holders.get(k, []) for k in message.keys})

    async def call(self, worker, request):  # the worker pool
        self.calls.append((trio.current_time(), worker))
        if worker == HUNG:
            raise CommClosedError(f"{worker}: no answer")
        if worker == EMPTY:
            return m.GetDataReply(data={}, missing=list(request.keys), errors={})
        return m.GetDataReply(data={k: dumps(k.upper()) for k in request.keys}, missing=[], errors={})

    def finished(self, key: str, *who_has: str) -> cs.FutureRecord:
        self.core.handle(cs.HandlesMade("h", (key,)))
        self.core.handle(cs.CallsSubmitted("s", (key,), (Kept(),), {}))
        self.core.handle(cs.FinishReported("f", key, who_has))
        return self.core.futures[key]


async def test_only_a_holder_that_answered_missing_is_named_to_the_scheduler():
    """An unreachable holder is not reported in missing_data; one that answered "missing" is.

    (Before: the client named every holder it failed to fetch from, and the
    scheduler dropped a live, hung worker's copy.)
    """
    client = FakeClient(holders={"a": [GOOD], "b": [GOOD]})
    a, b = client.finished("a", HUNG), client.finished("b", EMPTY)
    values = await Fetcher(client, PAUSE_S).gather([a, b])
    assert values == {"a": "A", "b": "B"}
    missing = [o for o in client.sent if isinstance(o, cs.SendMissingData)]
    assert [(o.key, o.holders) for o in missing] == [("b", (EMPTY,))]


async def test_a_holder_that_did_not_answer_is_asked_again_only_after_a_pause(autojump_clock):
    """The scheduler still names the hung holder: the next try waits PAUSE_S, not a tight loop."""
    client = FakeClient(holders={})
    a = client.finished("a", HUNG)
    fetcher = Fetcher(client, PAUSE_S)
    with trio.move_on_after(3 * PAUSE_S + 0.1):
        client.holders["a"] = [HUNG]  # the scheduler has not noticed yet
        await fetcher.gather([a])
    times = [t for t, worker in client.calls if worker == HUNG]
    assert len(times) == 4
    assert all(later - earlier >= PAUSE_S for earlier, later in zip(times, times[1:]))
    assert not any(isinstance(o, cs.SendMissingData) for o in client.sent)


async def test_a_value_that_came_with_its_report_is_not_fetched_and_gather_is_still_a_checkpoint():
    """A small value arrives with its `key_finished`: `gather` asks no worker
    for it, opens no nursery for fetches it does not make, and is still a
    checkpoint (seen deterministically as a cancel point: under a cancelled
    scope it raises `Cancelled` rather than return)."""
    client = FakeClient(holders={})
    client.core.handle(cs.HandlesMade("h", ("a",)))
    client.core.handle(cs.CallsSubmitted("s", ("a",), (Kept(),), {}))
    client.core.handle(cs.FinishReported("f", "a", (GOOD,), dumps(5)))
    record = client.core.futures["a"]
    with trio.CancelScope() as scope:
        scope.cancel()
        await Fetcher(client, PAUSE_S).gather([record])
    assert scope.cancelled_caught, "gather returned without a checkpoint"
    assert await Fetcher(client, PAUSE_S).gather([record]) == {"a": 5}
    assert client.calls == []
