"""The ledger oracles: runs against their excuses, losses of scattered data
against their holders, deliveries against each other (no cluster runs here).

Each oracle is shown a ledger it must accept and, for every rule, one it
must reject: a judge that accepts everything would make every run pass.
"""

from __future__ import annotations

from trioflow.sim.ledger import Ledger
from trioflow.sim.oracles import check_data_losses, check_deliveries, check_executions
from trioflow.sim.workload import Ref, TaskNode, Workload

# x -> y -> z, and w alone.
WORKLOAD = Workload(
    [],
    [
        TaskNode("x", "source", (1,), "chain", 0),
        TaskNode("y", "step", (Ref("x"), 1), "chain", 0),
        TaskNode("z", "step", (Ref("y"), 2), "chain", 0),
        TaskNode("w", "source", (2,), "map", 0),
    ],
    [0.0],
)


def registered(ledger: Ledger, *nodes: str) -> Ledger:
    for node in nodes:
        ledger.registered(node)
    return ledger


def test_one_run_per_key_needs_no_excuse():
    """Each key running once is always fine."""
    ledger = Ledger()
    for key in ("x", "y", "z", "w"):
        ledger.ran(key, "worker-0", 1.0)
    assert check_executions(WORKLOAD, ledger) == []


def test_a_second_run_without_an_excuse_is_a_violation():
    """A key that runs twice with nothing lost, fetched in vain or restarted is reported."""
    ledger = registered(Ledger(), "worker-0", "worker-1")
    ledger.ran("y", "worker-0", 1.0)
    ledger.ran("y", "worker-1", 2.0)
    # A loss of an unrelated worker's unrelated key excuses nothing here.
    ledger.worker_lost("worker-1", {"w"}, 1.5, "left the scheduler")
    [problem] = check_executions(WORKLOAD, ledger)
    assert problem.startswith("y ran 2 times (worker-0 at 1.000, worker-1 at 2.000), but 0 loss(es)")


def test_a_loss_on_the_key_or_an_input_excuses_one_more_run():
    """A worker lost with y (or its input x) assigned, running or held there
    allows y one more run, and only one."""
    ledger = registered(Ledger(), "worker-0", "worker-1")
    ledger.worker_lost("worker-0", {"x"}, 1.5, "left the scheduler")
    for time in (1.0, 2.0):
        ledger.ran("y", "worker-1", time)
    assert check_executions(WORKLOAD, ledger) == []
    ledger.ran("y", "worker-1", 3.0)
    [problem] = check_executions(WORKLOAD, ledger)
    assert "y ran 3 times" in problem and "allow at most 2" in problem and "worker-0 lost at 1.500" in problem


def test_a_death_and_its_notice_are_one_loss():
    """The process ending and the scheduler seeing its connection close are
    one event (its keys the union of both), until the node registers again."""
    ledger = registered(Ledger(), "worker-0")
    ledger.worker_lost("worker-0", {"x"}, 1.0, "its process ended, code -9")
    ledger.worker_lost("worker-0", {"y"}, 1.0, "left the scheduler")
    assert ledger.excuses_for(["x", "y"]) == {"worker-0 lost at 1.000 (its process ended, code -9)"}
    registered(ledger, "worker-0")
    ledger.worker_lost("worker-0", {"y"}, 5.0, "left the scheduler")
    assert len(ledger.excuses_for(["y"])) == 2
    # A node that never registered held nothing the scheduler knew of.
    ledger.worker_lost("worker-9", {"w"}, 1.0, "its process ended, code -9")
    assert ledger.excuses_for(["w"]) == set()


def test_a_failed_fetch_excuses_a_rerun():
    """A `replica_missing` for x allows x, and what depends on it, another run."""
    ledger = Ledger()
    ledger.excuse(["x"], "a fetch failed at 2.000 (reported by sim://worker-1:8801)")
    for time in (1.0, 3.0):
        ledger.ran("x", "worker-0", time)
        ledger.ran("z", "worker-0", time)
    assert check_executions(WORKLOAD, ledger) == []


def test_a_scheduler_restart_excuses_only_what_no_worker_brought_back():
    """After a restart, a key that had run (its value perhaps only at the
    client) or was running on a worker not back in time may run again; a
    key a worker that came back still holds, or one that had never run (a
    task that was only queued on a worker), may not."""
    ledger = registered(Ledger(), "worker-0", "worker-1")
    ledger.ran("x", "worker-0", 1.0)  # done before the restart; nobody keeps it
    ledger.ran("w", "worker-0", 1.0)  # done before, and worker-0 still holds it
    ledger.scheduler_died(2.0, {"worker-0": {"w"}, "worker-1": {"y"}})  # y running on worker-1
    ledger.recovery_ended(5.0, {"worker-0": {"w"}})  # worker-1 is late
    for key, node in (("x", "worker-0"), ("y", "worker-0"), ("y", "worker-1"), ("z", "worker-0")):
        ledger.ran(key, node, 6.0)
    assert check_executions(WORKLOAD, ledger) == []
    ledger.ran("w", "worker-0", 6.0)  # held by a worker that came back: no excuse
    ledger.ran("z", "worker-1", 7.0)  # z never ran before and ran nowhere: its input's excuse only
    problems = check_executions(WORKLOAD, ledger)
    assert [p.split(" ran ")[0] for p in problems] == ["w"]
    ledger.ran("z", "worker-1", 8.0)
    assert [p.split(" ran ")[0] for p in check_executions(WORKLOAD, ledger)] == ["w", "z"]


def test_scattered_data_may_be_declared_lost_only_when_every_holder_was_lost():
    """A loss is justified when no live worker offered a copy, or each one
    that did was cut off by a fault; a holder still registered, or one that
    had simply not come back yet, makes it a violation."""
    ledger = Ledger()
    ledger.data_lost("data-0", 1.0, ())
    ledger.data_lost("data-0", 2.0, (("worker-1", "cut off"),))
    assert check_data_losses(ledger) == []
    ledger.data_lost("data-1", 3.0, (("worker-1", "cut off"), ("worker-2", "registered")))
    ledger.data_lost("data-2", 4.0, (("worker-3", "absent"),))
    assert check_data_losses(ledger) == [
        "data-1: declared lost at 3.000 while worker-2 (registered) held a copy",
        "data-2: declared lost at 4.000 while worker-3 (absent) held a copy",
    ]


def test_a_struck_holder_that_leaves_in_the_same_instant_was_lost():
    """Two workers cut off together leave one after the other: when the
    first one's departure loses the data, the second, struck and still
    registered, counts as lost if it leaves in that same instant; one that
    stays registered after does not."""
    ledger = registered(Ledger(), "worker-1", "worker-2")
    ledger.data_lost("data-0", 3.0, (("worker-1", "registered, struck"),))
    ledger.worker_lost("worker-1", set(), 3.0, "left the scheduler")
    ledger.data_lost("data-1", 5.0, (("worker-2", "registered, struck"),))
    ledger.worker_lost("worker-2", set(), 5.5, "left the scheduler")
    assert check_data_losses(ledger) == [
        "data-1: declared lost at 5.000 while worker-2 (registered, struck) held a copy"
    ]


def test_a_worker_struck_since_it_registered_is_cut_off():
    """`cut_off` is the set of nodes struck by a worker fault since they last registered."""
    ledger = Ledger()
    ledger.struck("worker-1")
    assert ledger.cut_off == {"worker-1"}
    ledger.registered("worker-1")
    assert ledger.cut_off == set()


def test_a_key_delivered_twice_with_different_values_is_a_violation():
    """One value per key, wherever it was seen; the first difference is named."""
    ledger = Ledger()
    ledger.delivered("x", 5, "the client's first fetch")
    ledger.delivered("x", 5, "the copy on sim://worker-1:8801")
    ledger.delivered("y", 7, "the client's first fetch")
    assert check_deliveries(ledger) == []
    ledger.delivered("y", 8, "the client's fetch at the end")
    ledger.delivered("y", 9, "the copy on sim://worker-2:8802")
    assert check_deliveries(ledger) == [
        "y: delivered as 7 (the client's first fetch) and as 8 (the client's fetch at the end)"
    ]
