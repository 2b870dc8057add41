"""A client whose connection breaks while the scheduler stays up reconnects
and goes on, however long after the scheduler's start that happens."""

import trio

import trioflow
from tests.conftest import wait_until


def inc(x):
    return x + 1


async def test_a_client_reconnecting_after_the_recovery_window_is_served():
    """A reconnecting client says it is recovering; past the scheduler's
    recovery_grace its resubmission and new work are handled at once (they
    used to wait for a release that was never scheduled)."""
    config = trioflow.Config(recovery_grace=0.1)
    async with trioflow.AsyncLocalCluster(1, processes=False, config=config) as cluster:
        async with trioflow.AsyncClient(cluster, config=config) as client:
            held = client.submit(inc, 1)
            assert await held == 2
            scheduler = cluster.scheduler
            await wait_until(lambda: not scheduler.state.in_recovery(), message="the recovery window to close")
            old = scheduler.clients[client.id]
            old.close("test: the connection broke")
            await wait_until(
                lambda: client.status == "running" and scheduler.clients.get(client.id) not in (None, old),
                message="the client to reconnect",
            )
            with trio.fail_after(10):
                assert await client.submit(inc, 41) == 42
                assert await held == 2
