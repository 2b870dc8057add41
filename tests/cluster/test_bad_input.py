"""Bad input on any port closes that one connection; everyone else is served."""

import logging
import os
import struct

import pytest
import trio

from trioflow.comm import (
    FrameLimits,
    open_connection,
    parse_address,
)
from trioflow.comm.auth import CLUSTER, Credentials, authenticate_connector
from trioflow.errors import CommClosedError

from tests.conftest import wait_until


def inc(x):
    return x + 1


async def raw_connection(address, authenticate=True):
    """A TCP stream to `address`, authenticated with the session's token
    (the bytes sent next then reach the wire decoding) unless told not to."""
    _, host, port = parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    if authenticate:
        credentials = Credentials.from_token(os.environ["TRIOFLOW_TOKEN"])
        await authenticate_connector(stream, credentials, CLUSTER, address, 5)
    return stream


async def assert_closed_by_peer(stream, timeout=5.0):
    """The peer closes the stream: reads end (EOF or reset) within `timeout`."""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return


BAD_BYTES = {
    "garbage": b"\x00\x01hello, is this the scheduler?\r\n" * 4,
    "zero frames": struct.pack("<I", 0),
    "huge frame": struct.pack("<I", 1) + struct.pack("<Q", 1 << 40),
    "not msgpack": struct.pack("<I", 1) + struct.pack("<Q", 4) + b"\xc1\xc1\xc1\xc1",
}


@pytest.mark.parametrize("name", list(BAD_BYTES))
async def test_malformed_bytes_close_that_connection_only(client, cluster, name, caplog):
    """Garbage, a zero-frame batch, an oversized frame or bad msgpack: that
    connection closes with a logged reason; a running client is unaffected."""
    pending = client.submit(inc, 1)
    stream = await raw_connection(cluster.scheduler_address)
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        await stream.send_all(BAD_BYTES[name])
        await assert_closed_by_peer(stream)
    assert any("closing a connection" in r.getMessage() for r in caplog.records)
    assert await pending == 2
    assert await client.submit(inc, 2) == 3


@pytest.mark.parametrize("name", list(BAD_BYTES))
async def test_bytes_before_authentication_close_that_connection_only(client, cluster, name, caplog):
    """The same bytes from a peer that never authenticated are refused by the
    first exchange (not a byte of msgpack is decoded); others are served."""
    pending = client.submit(inc, 1)
    stream = await raw_connection(cluster.scheduler_address, authenticate=False)
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        await stream.send_all(BAD_BYTES[name])
        await assert_closed_by_peer(stream)
    assert any("did not authenticate" in r.getMessage() for r in caplog.records)
    assert await pending == 2


async def hello_then(scheduler, role, messages, protocol=1, **hello):
    """Say hello as `role` (raw maps: no checks on our side), then send `messages`."""
    stream = await raw_connection(scheduler)
    async with open_connection(stream, FrameLimits(), peer=scheduler) as conn:
        conn.send({"op": "hello", "role": role, "protocol": protocol, **hello})
        await conn.flush()
        if role == "worker":
            conn.send({"op": "register", "held": {}, "running": [], "done": True})
        for message in messages:
            conn.send(message)
        with trio.fail_after(5):
            try:
                while True:
                    await conn.receive()
            except CommClosedError:
                return


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"op": "launch_missiles"}], "unknown op 'launch_missiles'"),
        ([{"op": "task_finished", "key": "k", "nbytes": 1}], "op 'task_finished' may not be sent client->scheduler"),
        ([{"op": "release_keys"}], "'release_keys': lacks field 'keys'"),
        ([{"op": "release_keys", "keys": [5]}], "'release_keys': field keys[0] must be a key of at most"),
    ],
)
async def test_bad_client_messages_close_that_client_only(client, cluster, messages, reason, caplog):
    """Unknown ops, ops of another role and mistyped fields of one-way
    messages close that client with a logged reason naming the problem;
    other clients' work goes on."""
    pending = client.submit(inc, 10)
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        await hello_then(cluster.scheduler_address, "client", messages, client_id="rogue")
    assert any(reason in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    # Not at once: the peer sees its connection closed before the
    # scheduler's driver handles the departure (posted after the reader ends).
    await wait_until(lambda: "rogue" not in cluster.scheduler.clients, timeout=5, message="the rogue client to go")
    assert await pending == 11


async def test_a_bad_hello_is_refused(client, cluster, caplog):
    """A wrong protocol version or role is refused before anything else."""
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        await hello_then(cluster.scheduler_address, "client", [], client_id="old", protocol=99)
        await hello_then(cluster.scheduler_address, "nanny", [])
        await hello_then(cluster.scheduler_address, "peer", [])
    messages = [r.getMessage() for r in caplog.records]
    assert any("speaks trioflow protocol 1, not 99" in m for m in messages)
    assert any("field role must be one of 'client', 'worker', 'peer', 'control', got 'nanny'" in m for m in messages)
    assert any("which serves client or worker connections, not peers" in m for m in messages)
    assert await client.submit(inc, 1) == 2


async def test_a_worker_sending_nonsense_is_dropped_and_its_work_rerouted(client, cluster, caplog):
    """A worker that breaks the protocol is disconnected like a dead worker."""
    rogue = "tcp://127.0.0.1:1"
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        await hello_then(
            cluster.scheduler_address, "worker", [{"op": "task_finished", "key": 3}],
            address=rogue, nthreads=1,
        )
    assert any("'task_finished': field key must be a key" in r.getMessage() for r in caplog.records)
    await wait_until(lambda: rogue not in cluster.scheduler.state.workers, timeout=5, message="the rogue worker to go")
    assert await client.submit(inc, 5) == 6


async def test_bad_bytes_to_a_worker_port_do_not_hurt_the_worker(client, cluster):
    """Garbage sent to a worker's peer port closes that connection only."""
    worker = next(iter(cluster.workers.values()))
    stream = await raw_connection(worker.address)
    await stream.send_all(BAD_BYTES["garbage"])
    await assert_closed_by_peer(stream)
    assert sorted((await client.run(lambda: 1)).values()) == [1, 1]
