"""The scheduler core's queries: what the shell asks it, exact answers.

The shell answers `who_has`, `has_what`, `nthreads` and `scheduler_info`
with these, places scattered data with `scatter_targets`, checks a
client's requests against `wants` and a worker's claims against `knows`,
`claimable_keys` and `awaits_holder`.
"""

from tests.core.conftest import sid
from trioflow.core import SchedulerState
from trioflow.core.scheduler_events import (
    DataScattered,
    ReplicationRequested,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
)

A, B, C = "tcp://a", "tcp://b", "tcp://c"


def cluster() -> SchedulerState:
    """x in memory on A, y (needs x) processing on A, s scattered on B."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), A, 2))
    state.handle(WorkerConnected(sid(), B, 1))
    state.handle(TasksSubmitted(sid(), "c1", (TaskSpec("x", "run-x"),), ("x",)))
    worker = state.tasks["x"].processing_on
    state.handle(TaskStarted(sid(), worker, "x"))
    state.handle(TaskFinished(sid(), worker, "x", 10))
    state.handle(DataScattered(sid(), "c1", {"s": (20, (B,))}))
    state.handle(TasksSubmitted(sid(), "c1", (TaskSpec("y", "run-y", ("x",)),), ("y",)))
    return state


def test_who_holds_what_and_how_many_threads():
    """who_has, has_what, nthreads, processing and copies describe the state exactly."""
    state = cluster()
    assert state.who_has() == {"x": [A], "s": [B], "y": []}
    assert state.who_has(["s", "ghost"]) == {"s": [B], "ghost": []}
    assert state.has_what() == {A: ["x"], B: ["s"]}
    assert state.nthreads() == {A: 2, B: 1}
    assert state.processing() == {A: ["y"], B: []}
    assert state.copies(["x", "s", "y", "ghost"]) == {"x": 1, "s": 1, "y": None, "ghost": None}
    assert state.count_by_state() == {"memory": 2, "processing": 1}


def test_what_a_client_holds_and_a_worker_may_claim():
    """wants, knows, assigned_to, worker_keys and awaits_holder answer per key and per worker."""
    state = cluster()
    assert state.wants("c1", "y") and not state.wants("c2", "y") and not state.wants("c1", "ghost")
    assert state.knows("s") and not state.knows("ghost")
    assert (state.assigned_to("y"), state.assigned_to("x"), state.assigned_to("ghost")) == (A, None, None)
    assert state.worker_keys(A) == ["x", "y"] and state.worker_keys(B) == ["s"] and state.worker_keys(C) == []
    assert not state.awaits_holder("s")


def test_a_worker_may_claim_what_it_was_told_to_fetch():
    """claimable_keys: what it holds or runs, the copies asked of it, and its tasks' inputs.

    Its fetch can land after its connection broke (seed 137 of the partition
    mix: the scattered data was refused from the worker that had fetched it,
    and lost when its other holder left next)."""
    state = cluster()
    state.handle(WorkerConnected(sid(), C, 1))
    state.handle(TasksSubmitted(sid(), "c1", (TaskSpec("z", "run-z", ("s",), workers=(C,)),), ("z",)))
    state.handle(ReplicationRequested(sid(), "c1", ("x",), 3))
    assert state.tasks["z"].processing_on == C and C in state.tasks["x"].replicas_pending
    assert state.claimable_keys(C) == {"z", "s", "x"}  # its task, that task's input, the copy asked of it
    assert state.claimable_keys(A) == {"x", "y"}  # y's input x is held there already
    assert state.claimable_keys("tcp://ghost") == set()


def test_scattered_data_goes_to_every_worker_or_round_robin_from_the_least_loaded():
    """Broadcast: every worker; otherwise one each, starting with the workers holding fewest values."""
    state = SchedulerState(worker_saturation=1.0)
    assert state.scatter_targets(["a"], broadcast=False) == {}
    for worker in (A, B, C):
        state.handle(WorkerConnected(sid(), worker, 1))
    state.handle(DataScattered(sid(), "c1", {"old": (8, (A,))}))
    assert state.scatter_targets(["p", "q"], broadcast=True) == {"p": (A, B, C), "q": (A, B, C)}
    assert state.scatter_targets(["p", "q", "r", "t"], broadcast=False) == {
        "p": (B,), "q": (C,), "r": (A,), "t": (B,)
    }


def test_replicas_are_counted_in_copies():
    """copies counts only the workers that hold the value, not those still fetching it."""
    state = cluster()
    state.handle(ReplicationRequested(sid(), "c1", ("s",), 2))
    assert state.copies(["s"]) == {"s": 1}
    assert list(state.tasks["s"].replicas_pending) == [A]


def _state_reads(module) -> list[str]:
    """Every `<x>.state.<name>` the module's source reads."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    return [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "state"
    ]


def test_the_scheduler_shell_asks_its_core_only_through_query_methods():
    """scheduler.py and scheduler_exchanges.py reach the core through its
    public methods (never its records), and never spell a task state."""
    import inspect

    from trioflow import scheduler, scheduler_exchanges
    from trioflow.core import TaskState

    reads = _state_reads(scheduler) + _state_reads(scheduler_exchanges)
    assert reads, "the scheduler shell should use its core"
    not_queries = sorted(
        {name for name in reads if name.startswith("_") or not callable(getattr(SchedulerState, name, None))}
    )
    assert not_queries == []
    source = inspect.getsource(scheduler) + inspect.getsource(scheduler_exchanges)
    spelled = [s.value for s in TaskState if f'"{s.value}"' in source or f"'{s.value}'" in source]
    assert spelled == []


def test_the_workers_registration_order_and_load():
    """`worker_addresses`, `is_registered` and `worker_load` (threads,
    processing, held) answer for registered workers only."""
    state = cluster()
    assert state.worker_addresses() == [A, B]
    assert state.is_registered(B) and not state.is_registered(C)
    assert state.worker_load(A) == (2, 1, 1)
    assert state.worker_load(B) == (1, 0, 1)
    assert state.worker_load(C) is None
