"""Through a scheduler restart, on the real shells in the simulator.

Each test drives a `SimCluster` (the real scheduler, nannies, workers and
client, on the simulated network and Trio's virtual clock) through one
scenario step by step, waiting for conditions rather than for time: a
condition that never comes fails the test at its (virtual) deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing

from trioflow.client import AsyncClient
from trioflow.config import Config
from trioflow.sim.cluster import SimCluster
from trioflow.sim.determinism import derive_rng, deterministic_scheduling
from trioflow.sim.faults import Fault
from trioflow.sim.network import SimNetwork
from trioflow.sim.trace import Trace, logs_into
from trioflow.sim.workload import SimUserError, fail, step

# Virtual seconds a step may take before the test fails (a minute of heartbeats).
STEP_DEADLINE_S = 60.0
# Virtual seconds between looks at a client-side condition.
POLL_S = 0.01

Scenario = Callable[[SimCluster, AsyncClient], Awaitable[None]]


def run_scenario(scenario: Scenario, *, seed: int = 1, n_workers: int = 3) -> Trace:
    """Run `scenario` against a fresh simulated cluster; return the trace.

    Raises whatever the scenario raises, and AssertionError if a shell
    logged an internal error."""
    trace, errors = Trace(), []
    config = Config()
    network = SimNetwork(derive_rng(seed, "network"), (0.001, 0.005))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cluster = SimCluster(
                seed=seed, network=network, trace=trace, config=config,
                n_workers=n_workers, nthreads=1, durations=(0.01, 0.05),
            )
            await cluster.start(nursery)
            client = AsyncClient(
                cluster.scheduler_address, config=config, network=network.for_node("client-0"),
                rng=derive_rng(seed, "client-0"), credentials=cluster.credentials.client_only(),
            )
            async with client:
                await scenario(cluster, client)
            nursery.cancel_scope.cancel(reason="the scenario is over")
        errors.extend(cluster.errors)

    with deterministic_scheduling(seed), logs_into(trace, errors):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not errors, errors
    return trace


async def until(cluster: SimCluster, condition: Callable[[], bool], what: str) -> None:
    """Wait (virtual time) until `condition()` holds on the current scheduler."""
    with trio.move_on_after(STEP_DEADLINE_S):
        while True:
            scheduler = cluster.scheduler
            if scheduler is not None and condition():
                return
            if scheduler is None:
                await trio.sleep(0.05)
                continue
            with trio.move_on_after(0.5):  # a new scheduler may replace this one
                await scheduler.wait_for(condition)
    raise AssertionError(f"not within {STEP_DEADLINE_S:g} virtual seconds: {what}")


def holders(cluster: SimCluster, key: str) -> list[str]:
    ts = cluster.scheduler.state.tasks.get(key) if cluster.scheduler else None
    return [] if ts is None or ts.state.value != "memory" else list(ts.who_has)


def node_of(address: str) -> str:
    """``sim://worker-2:8802`` -> ``worker-2``."""
    return address.split("//")[1].split(":")[0]


def test_replication_outlives_a_scheduler_restart():
    """Two copies asked for before a scheduler restart are still kept after
    it: the new scheduler re-replicates when a holder dies, so killing the
    two original holders one after the other loses nothing.

    Fails without the client's `_replicate_again`: the new scheduler never
    hears of the request, and the copy lost with the first holder is not
    replaced."""

    async def scenario(cluster: SimCluster, client: AsyncClient) -> None:
        [future] = await client.scatter([1234])
        await client.replicate([future], n=2)
        first = cluster.scheduler
        original = holders(cluster, future.key)
        assert len(original) == 2
        await cluster.inject(Fault(0.0, "scheduler_restart", "scheduler", 0.5))
        await until(
            cluster,
            lambda: cluster.scheduler is not first and not cluster.scheduler.state.recovery_open
            and future.key in cluster.scheduler.state.replicated,
            "the new scheduler keeps two copies",
        )
        for address in original:
            await cluster.inject(Fault(0.0, "crash", node_of(address)))
            await until(
                cluster,
                lambda: len([a for a in holders(cluster, future.key) if a != address]) >= 2,
                f"a new copy after the death of {address}",
            )
        with trio.fail_after(STEP_DEADLINE_S):
            assert await future == 1234

    run_scenario(scenario)


def test_a_worker_late_for_the_recovery_brings_its_scattered_data_back():
    """The only holder of scattered data hangs across a scheduler restart and
    registers after the recovery window: the data is declared lost at the
    end of the window (nobody had brought it back), then taken from the
    late worker (its claim contradicts nothing the new scheduler knows), and
    the client's future has its value again.

    Fails without `awaits_holder` in `Scheduler._checked_claims`: the late
    claim is refused and the worker told to free the data for good."""

    async def scenario(cluster: SimCluster, client: AsyncClient) -> None:
        [future] = await client.scatter([4321])
        [holder] = holders(cluster, future.key)
        first = cluster.scheduler
        grace = cluster.config.recovery_grace
        await cluster.inject(Fault(0.0, "hang", node_of(holder), grace + 3.0))
        await cluster.inject(Fault(0.0, "scheduler_restart", "scheduler", 0.5))
        await until(
            cluster,
            lambda: cluster.scheduler is not first
            and cluster.scheduler.state.tasks.get(future.key) is not None
            and cluster.scheduler.state.tasks[future.key].state.value == "lost",
            "the data declared lost at the end of the recovery window",
        )
        await until(cluster, lambda: holders(cluster, future.key) == [holder], "the late holder brings it back")
        with trio.fail_after(STEP_DEADLINE_S):
            while future.status != "finished":  # the client hears it is back
                await trio.sleep(POLL_S)
            assert await future == 4321

    trace = run_scenario(scenario)
    assert "it never had here" not in trace.text()


def test_a_task_submitted_after_a_restart_on_a_failed_future_raises_its_error():
    """A task that failed before a scheduler restart is not resubmitted (its
    future keeps its error); a task submitted afterwards that depends on it
    raises that same error, as it would have without the restart.

    Found by `trioflow chaos --real` (seed 0 of the CI sweep): the new
    scheduler had never heard of the failed key, so the dependent raised
    `LostData` naming a key that is not even scattered data."""

    async def scenario(cluster: SimCluster, client: AsyncClient) -> None:
        failed = client.submit(fail, "bad", key="bad")
        with trio.fail_after(STEP_DEADLINE_S):
            assert isinstance(await failed.exception(), SimUserError)
        first = cluster.scheduler
        await cluster.inject(Fault(0.0, "scheduler_restart", "scheduler", 0.5))
        await until(
            cluster,
            lambda: cluster.scheduler is not first and not cluster.scheduler.state.recovery_open,
            "the new scheduler's recovery window closed",
        )
        dependent = client.submit(step, "after", failed, 1, key="after")
        with trio.fail_after(STEP_DEADLINE_S):
            error = await dependent.exception()
        assert isinstance(error, SimUserError) and str(error) == "bad failed on purpose"

    run_scenario(scenario)
