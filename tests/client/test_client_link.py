"""The scheduler's links to its clients space their writes (an in-process cluster)."""

from __future__ import annotations

from trioflow.scheduler import CLIENT_WRITE_INTERVAL_S


def inc(x):
    return x + 1


async def test_only_client_links_space_their_writes(client, cluster):
    """Results to a client go out at most every CLIENT_WRITE_INTERVAL_S while it
    is busy (`Connection.write_interval`, tested in tests/comm); the links to
    workers write at once, so a task's order is never held back."""
    assert await client.submit(inc, 1).result() == 2
    scheduler = cluster.scheduler
    assert 0 < CLIENT_WRITE_INTERVAL_S <= 0.001  # a bound on the delay a result can take
    assert scheduler.clients[client.id].conn.write_interval == CLIENT_WRITE_INTERVAL_S
    assert len(scheduler.workers) == 2
    assert all(link.conn.write_interval == 0 for link in scheduler.workers.values())
