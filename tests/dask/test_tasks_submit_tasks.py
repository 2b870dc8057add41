"""Tasks that submit tasks: get_worker, get_client, worker_client, secede, rejoin."""

import pytest

import trioflow


def fib(n):
    """Recursive Fibonacci, each call a task that submits its two children."""
    if n < 2:
        return n
    with trioflow.worker_client() as client:
        a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
        return a.result() + b.result()


def where_am_i():
    worker = trioflow.get_worker()
    return worker.address, trioflow.get_client().scheduler_address


@pytest.mark.processes
def test_recursive_fibonacci_on_two_one_thread_worker_processes():
    """fib(8) through worker_client on 2x1-thread worker processes: no deadlock,
    the right value, and the task client reaches the workers' own scheduler."""
    with trioflow.LocalCluster(2, threads_per_worker=1) as cluster, trioflow.Client(cluster) as client:
        assert client.submit(fib, 8).result(timeout=20) == 21
        address, scheduler = client.submit(where_am_i, pure=False).result(timeout=30)
        assert address in client.nthreads() and scheduler == cluster.scheduler_address


def wait_for_child_without_seceding():
    client = trioflow.get_client()
    return client.submit(abs, -7, pure=False).result(timeout=2)


def test_a_task_that_waits_without_seceding_holds_its_thread():
    """Without secede, a task waiting on its own child on a single 1-thread
    worker cannot get it run (the child times out): secede is what frees it."""
    with trioflow.LocalCluster(1, processes=False) as cluster, trioflow.Client(cluster) as client:
        with pytest.raises(TimeoutError):
            client.submit(wait_for_child_without_seceding).result(timeout=30)


def secede_rejoin_then_compute(n):
    trioflow.secede()
    trioflow.secede()  # a second call does nothing
    value = trioflow.get_client().submit(abs, -n, pure=False).result(timeout=30)
    trioflow.rejoin()
    trioflow.rejoin()
    return value + 1


def test_secede_and_rejoin_by_hand_on_one_thread():
    """secede/rejoin by hand on one 1-thread worker: the child runs, the parent resumes."""
    with trioflow.LocalCluster(1, processes=False) as cluster, trioflow.Client(cluster) as client:
        assert client.submit(secede_rejoin_then_compute, 4).result(timeout=30) == 5
        [worker] = cluster.workers.values()
        assert worker.state.seceded == {} and worker.state.executing == {}


def test_outside_a_task_these_say_so():
    """get_worker, get_client, secede and rejoin outside a task raise ValueError naming the call."""
    for call in (trioflow.get_worker, trioflow.get_client, trioflow.secede, trioflow.rejoin):
        with pytest.raises(ValueError, match=f"{call.__name__}\\(\\) works only inside a task"):
            call()
