"""`background_tasks` and `side_by_side`: one error comes out as itself.

trioflow/nurseries.py says why. The two differ only in what the end of the
block does: background helpers are cancelled, side-by-side tasks are awaited.
"""

import pytest
import trio
import trio.testing

from trioflow.nurseries import background_tasks, side_by_side


async def test_side_by_side_waits_for_every_task_and_runs_them_at_once():
    finished = []

    async def start(name: str, all_started: trio.Event, started: list[str]) -> None:
        started.append(name)
        if len(started) == 3:
            all_started.set()
        await all_started.wait()  # only returns if the three run at once
        await trio.sleep(0)
        finished.append(name)

    all_started, started = trio.Event(), []
    with trio.fail_after(5):
        async with side_by_side() as nursery:
            for name in "abc":
                nursery.start_soon(start, name, all_started, started)
    assert sorted(finished) == ["a", "b", "c"]


async def test_background_tasks_are_cancelled_when_the_block_ends():
    ended = []

    async def helper() -> None:
        try:
            await trio.sleep_forever()
        finally:
            ended.append("cancelled")

    with trio.fail_after(5):
        async with background_tasks() as nursery:
            nursery.start_soon(helper)
            await trio.sleep(0)
    assert ended == ["cancelled"]


@pytest.mark.parametrize("nursery_of", [background_tasks, side_by_side])
async def test_a_lone_error_comes_out_as_itself_and_the_rest_are_cancelled(nursery_of):
    cancelled = []

    async def fails() -> None:
        raise OSError("no such file")

    async def waits() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    with trio.fail_after(5), pytest.raises(OSError, match="no such file"):
        async with nursery_of() as nursery:
            nursery.start_soon(waits)
            nursery.start_soon(fails)
    assert cancelled == [True]


@pytest.mark.parametrize("nursery_of", [background_tasks, side_by_side])
async def test_two_errors_at_once_stay_a_group(nursery_of):
    go = trio.Event()

    async def fails(message: str) -> None:
        await go.wait()
        raise ValueError(message)  # no checkpoint: the other's error cannot cancel this one

    with trio.fail_after(5), pytest.RaisesGroup(ValueError, ValueError):
        async with nursery_of() as nursery:
            nursery.start_soon(fails, "one")
            nursery.start_soon(fails, "two")
            await trio.testing.wait_all_tasks_blocked()
            go.set()  # wakes both in the same step
            await trio.sleep_forever()
