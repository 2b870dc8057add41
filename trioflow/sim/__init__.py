"""Deterministic simulation: the chaos lab (design.md §2, §3; docs/chaos.md).

Only tests and the CLI import this package. The entry point is
`run_seed(seed, settings=None, plan=None) -> RunReport`; the pieces are
`SimNetwork` (network.py), `SimCluster` (cluster.py), `SimLauncher` and
`SimExecutor` (nodes.py), `Fault` plans (faults.py), workloads
(workload.py), oracles (oracles.py) and `Trace` (trace.py).

The lab's names are loaded on first use, so that ``trioflow --help`` (which
registers the ``chaos`` subcommand, and so does every worker process as it
starts) does not import the whole cluster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioflow.sim.network import ConnectionInfo, NetworkView, SimNetwork, SimStream

_LAZY = {
    "ConnectionInfo": "trioflow.sim.network",
    "NetworkView": "trioflow.sim.network",
    "SimNetwork": "trioflow.sim.network",
    "SimStream": "trioflow.sim.network",
    "run_seed": "trioflow.sim.lab",
    "LabSettings": "trioflow.sim.lab",
    "RunReport": "trioflow.sim.lab",
    "SimCluster": "trioflow.sim.cluster",
    "SimLauncher": "trioflow.sim.nodes",
    "SimExecutor": "trioflow.sim.nodes",
    "WorkerCrash": "trioflow.sim.nodes",
    "Fault": "trioflow.sim.faults",
    "FAULT_KINDS": "trioflow.sim.faults",
    "Trace": "trioflow.sim.trace",
}

__all__ = [*_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trioflow.sim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
