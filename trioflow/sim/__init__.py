"""Deterministic simulation: the chaos lab (design.md §2, §3).

Only tests and the CLI import this package.
"""

from trioflow.sim.network import ConnectionInfo, NetworkView, SimNetwork, SimStream

__all__ = ["ConnectionInfo", "NetworkView", "SimNetwork", "SimStream"]
