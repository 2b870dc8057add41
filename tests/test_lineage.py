"""The client's lineage: kept while needed for a resubmission, dropped after.

The decisions (what is kept, for how long) are the core's
(`trioflow.core.client_state.Lineage`); the compact form of a task and the
wire task made from it again are the shell's (`trioflow.lineage`).
"""

from trioflow.comm.messages import TaskWire
from trioflow.comm.serialize import Serialized, SerializedFunction
from trioflow.lineage import Lineage, keep, resubmission

F = SerializedFunction("f" * 64, Serialized(b"pickled f"))


def task(key, *deps):
    return TaskWire(key=key, function_id=F.function_id, args=Serialized(b"()"), dependencies=list(deps))


def remember(lineage, wire, function=F):
    lineage.remember(wire.key, keep(wire), None if function is None else function.payload)


def test_inputs_are_kept_while_a_held_dependent_needs_them():
    """x's record stays while y (held) depends on it, and goes with y."""
    lineage, held = Lineage(), {"y"}
    remember(lineage, task("x"))
    remember(lineage, task("y", "x"))
    lineage.forget("x", held)
    assert list(lineage.tasks) == ["x", "y"]
    held.clear()
    lineage.forget("y", held)
    assert not lineage and lineage.functions == {}


def test_functions_stay_while_any_task_uses_them():
    """A function payload is dropped only with the last task that uses it."""
    lineage, held = Lineage(), {"a", "b"}
    remember(lineage, task("a"))
    remember(lineage, task("b"))
    held.discard("a")
    lineage.forget("a", held)
    assert lineage.functions == {F.function_id: F.payload}
    held.discard("b")
    lineage.forget("b", held)
    assert lineage.functions == {}


def test_kept_tasks_are_submitted_again_as_they_came():
    """What the lineage gives back for a resubmission equals what was remembered, in order."""
    lineage = Lineage()
    tasks = [task("x"), task("y", "x"), TaskWire(key="s", scattered=True)]
    for t in tasks:
        remember(lineage, t, None if t.scattered else F)
    assert resubmission(lineage, lineage.tasks) == tasks


def test_scattered_keys_are_remembered_without_a_function():
    """Scattered data is kept as a lineage-less marker."""
    lineage = Lineage()
    remember(lineage, TaskWire(key="data", scattered=True), None)
    assert resubmission(lineage, lineage.tasks) == [TaskWire(key="data", scattered=True)]
    lineage.forget("data", set())
    assert not lineage
