"""The test helper that picks ports for servers the tests start."""

import socket

from tests.cluster.conftest import _ephemeral_ports, free_port


def test_free_ports_are_outside_the_range_of_outgoing_connections_and_never_repeat():
    """A port from the kernel's range for outgoing connections can be taken
    as a connection's source port before the server binds it (a scheduler
    then fails with "address already in use"): free_port stays out of that
    range, hands each port out once, and each one can be bound."""
    ports = [free_port() for _ in range(50)]
    assert not set(ports) & set(_ephemeral_ports())
    assert len(set(ports)) == len(ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
