"""The door every server port shares (`trioflow.comm.door.Door`)."""

from __future__ import annotations

import trio
import trio.testing

from trioflow import Config
from trioflow.comm import messages as m
from trioflow.comm.auth import CLUSTER, Credentials
from trioflow.comm.door import Door


def door() -> Door:
    return Door(
        "test-server",
        config=Config(),
        credentials=Credentials.generate(),
        credential_roles=frozenset({CLUSTER}),
        roles={"peer": m.PEER_TO_WORKER},
    )


async def test_a_handler_cancelled_before_its_connection_opened_closes_the_stream():
    """Seed 356 of the chaos lab's restart mix: a server stopping cancelled a
    handler that had accepted a stream but not yet authenticated it, and the
    stream stayed open, so the peer waited its whole connect timeout (10 s)
    for an answer. The door owns the stream: the peer now reads its end at
    once. The connection gate is left too."""
    ours, theirs = trio.testing.memory_stream_pair()
    entrance = door()
    with trio.CancelScope() as scope:
        scope.cancel()  # the server is stopping as the handler starts
        async with entrance.admit(theirs):
            raise AssertionError("a cancelled admission cannot reach its block")  # pragma: no cover
    with trio.fail_after(1):
        assert await ours.receive_some(64) == b""
    assert entrance.gate.try_enter()  # the cancelled admission did not keep a place
