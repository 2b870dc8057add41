"""A worker's registration, as a real scheduler reads it.

A worker says hello, registers what it holds and runs in `register`
chunks up to one marked ``done``, and then waits for its welcome. It may
send before the welcome arrives: a heartbeat when the welcome is slow,
the report of a task it ran through a reconnection. A receive returns
the batches that arrived together (`Connection.receive`), so what
follows ``done`` can come in the same receive as the registration; the
scheduler handles it after the welcome, as if it had come later.
"""

import pytest

from tests.cluster import raw_peer as rp
from tests.cluster.conftest import free_port
from tests.conftest import wait_until

REGISTER_DONE = {"op": "register", "held": {}, "running": [], "done": True}
HEARTBEAT = {"op": "heartbeat", "metrics": {}}


@pytest.mark.parametrize(
    "one_write",
    [
        pytest.param(rp.encode_batch(REGISTER_DONE) + rp.encode_batch(HEARTBEAT), id="two-batches"),
        pytest.param(rp.encode_batch(REGISTER_DONE, HEARTBEAT), id="one-batch"),
    ],
)
async def test_what_a_worker_sends_with_its_registration_is_heard_after_its_welcome(cluster, one_write):
    """The last `register` chunk and a heartbeat, in one write: the worker
    is welcomed, then its heartbeat is answered, and it stays registered."""
    address = f"tcp://127.0.0.1:{free_port()}"
    async with rp.connect(cluster.scheduler_address) as fake:
        await fake.say_hello("worker", address=address, nthreads=1)
        await fake.send_bytes(one_write)
        assert (await fake.next_message())["op"] == "welcome"
        assert (await fake.next_message(skip=()))["op"] == "heartbeat_ack"
        await wait_until(
            lambda: address in cluster.scheduler.state.worker_addresses(), timeout=5, message="the worker to register"
        )
