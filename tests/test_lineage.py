"""The client's lineage: kept while needed for a resubmission, dropped after."""

from trioflow.comm.messages import TaskWire
from trioflow.comm.serialize import Serialized, SerializedFunction
from trioflow.lineage import Lineage

F = SerializedFunction("f" * 64, Serialized(b"pickled f"))


def task(key, *deps):
    return TaskWire(key=key, function_id=F.function_id, args=Serialized(b"()"), dependencies=list(deps))


def test_inputs_are_kept_while_a_held_dependent_needs_them():
    """x's record stays while y (held) depends on it, and goes with y."""
    lineage, held = Lineage(), {"y"}
    lineage.remember(task("x"), F)
    lineage.remember(task("y", "x"), F)
    lineage.forget("x", held.__contains__)
    assert list(lineage.tasks) == ["x", "y"]
    held.clear()
    lineage.forget("y", held.__contains__)
    assert not lineage and lineage.functions == {}


def test_functions_stay_while_any_task_uses_them():
    """A function payload is dropped only with the last task that uses it."""
    lineage, held = Lineage(), {"a", "b"}
    lineage.remember(task("a"), F)
    lineage.remember(task("b"), F)
    held.discard("a")
    lineage.forget("a", held.__contains__)
    assert lineage.functions == {F.function_id: F.payload}
    held.discard("b")
    lineage.forget("b", held.__contains__)
    assert lineage.functions == {}


def test_kept_tasks_are_submitted_again_as_they_came():
    """What the lineage gives back for a resubmission equals what was remembered, in order."""
    lineage = Lineage()
    tasks = [task("x"), task("y", "x"), TaskWire(key="s", scattered=True)]
    for t in tasks:
        lineage.remember(t, None if t.scattered else F)
    assert lineage.messages() == tasks


def test_scattered_keys_are_remembered_without_a_function():
    """Scattered data is kept as a lineage-less marker."""
    lineage = Lineage()
    lineage.remember(TaskWire(key="data", scattered=True), None)
    assert lineage.messages() == [TaskWire(key="data", scattered=True)]
    lineage.forget("data", lambda key: False)
    assert not lineage
