"""The client's core: events in, the exact list of outputs out.

Every test compares the *whole* output list (an extra message fails it), and
every expected output is built from the event's own `stimulus_id`, never
copied from what the core returned. The `client` fixture checks the core's
invariants at teardown.
"""

from __future__ import annotations

import dataclasses

import pytest

from trioflow.core import Cancelled, DataLost, UserError, WorkerDeaths
from trioflow.core.client_state import (
    CANCELLED,
    ERROR,
    FINISHED,
    LOST,
    PENDING,
    CallsRefused,
    CallsSubmitted,
    ClientState,
    ClientStatus,
    ClosingRequested,
    ConnectionEnded,
    CopiesRequested,
    FailureReported,
    FetchFailed,
    FinishReported,
    FiredAndForgotten,
    FutureDone,
    FuturesCancelled,
    GaveUp,
    HandlesDropped,
    HandlesMade,
    HoldersLearned,
    LossReported,
    RefusalReported,
    RequestReplicas,
    RestartReported,
    SchedulerConnected,
    SchedulerDisconnected,
    SendCancelKeys,
    SendFireAndForget,
    SendMissingData,
    SendReleaseKeys,
    SendTasks,
    ValuesScattered,
    check_invariants,
)
from trioflow.errors import CommClosedError

BOOM = UserError(exception=None, type_name="ZeroDivisionError", message="division by zero", traceback="")
W1, W2 = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1"


@dataclasses.dataclass
class Kept:
    """A kept task as the lineage sees it (the shell's `KeptTask` has more)."""

    dependencies: tuple[str, ...] = ()
    function_id: str | None = "f"


_ids = iter(range(10**9))


def sid(what: str = "ev") -> str:
    return f"{what}-{next(_ids)}"


@pytest.fixture
def client():
    state = ClientState(max_queued_while_away=3)
    yield state
    assert check_invariants(state) == []


def connect(state: ClientState, recovering: bool = False):
    return state.handle(SchedulerConnected(sid("connected"), recovering))


def submit(state: ClientState, key: str, *deps: str):
    """Make a handle on `key` and submit its task; return the submission's outputs."""
    assert state.handle(HandlesMade(sid("handle"), (key,))) == []
    return state.handle(CallsSubmitted(sid("submit"), (key,), (Kept(deps),), {"f": b"pickled f"}))


def running(state: ClientState, *keys: str) -> ClientState:
    connect(state)
    for key in keys:
        submit(state, key)
    return state


# ------------------------------------------------------------ submitting --


def test_a_new_handle_makes_a_pending_record_and_says_nothing(client):
    """HandlesMade: a pending record with one handle per listing; no output."""
    connect(client)
    assert client.handle(HandlesMade(sid(), ("x", "x", "y"))) == []
    assert (client.futures["x"].status, client.futures["x"].refs, client.futures["x"].done()) == (PENDING, 2, False)
    assert client.futures["y"].refs == 1


def test_a_submitted_task_is_kept_and_sent(client):
    """While connected, a submitted task goes into the lineage and out as SendTasks, wanted."""
    connect(client)
    client.handle(HandlesMade(sid(), ("x",)))
    ev = CallsSubmitted(sid(), ("x",), (Kept(),), {"f": b"pickled f"})
    assert client.handle(ev) == [SendTasks(ev.stimulus_id, ("x",), ("x",))]
    assert list(client.lineage.tasks) == ["x"] and client.lineage.functions == {"f": b"pickled f"}


def test_a_task_whose_input_failed_for_good_fails_at_once_and_is_not_sent(client):
    """The dependent of a failed future gets that failure now; nothing is sent or kept for it."""
    running(client, "x")
    client.handle(FailureReported(sid(), ("x",), BOOM))
    client.handle(HandlesMade(sid(), ("y",)))
    ev = CallsSubmitted(sid(), ("y",), (Kept(("x",)),), {"f": b"pickled f"})
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "y")]
    assert (client.futures["y"].status, client.futures["y"].failure) == (ERROR, BOOM)
    assert "y" not in client.lineage.tasks


def test_tasks_submitted_while_away_wait_in_the_lineage_and_go_with_the_resubmission(client):
    """Reconnecting: no SendTasks, the queue counts them; on reconnect the whole lineage goes, wanted."""
    running(client, "x")
    assert client.handle(SchedulerDisconnected(sid())) == []
    assert client.status is ClientStatus.RECONNECTING
    assert submit(client, "y", "x") == []
    assert client.queued_while_away == 1
    ev = SchedulerConnected(sid(), recovering=True)
    assert client.handle(ev) == [SendTasks(ev.stimulus_id, ("x", "y"), ("x", "y"))]
    assert client.queued_while_away == 0 and client.status is ClientStatus.RUNNING


def test_the_queue_kept_for_an_absent_scheduler_is_bounded(client):
    """refusal: past max_queued_while_away tasks, new ones are refused (and never while running)."""
    running(client)
    assert client.refusal(10**6) is None
    client.handle(SchedulerDisconnected(sid()))
    for key in ("a", "b"):
        submit(client, key)
    assert client.refusal(1) is None
    assert client.refusal(2) == "2 tasks are already waiting for it (at most 3)"


def test_a_client_not_connected_yet_refuses_tasks(client):
    """A new or closing client takes no task: refusal names its status."""
    assert client.refusal(1) == "the client is new"
    connect(client)
    client.handle(ClosingRequested(sid()))
    assert client.refusal(1) == "the client is closing"


def test_a_resubmission_does_not_want_what_failed_for_good_and_asks_for_copies_again(client):
    """The lineage goes whole; wanted leaves out failed keys; replicate requests follow, by n."""
    running(client, "a", "b", "c")
    client.handle(FailureReported(sid(), ("b",), BOOM))
    client.handle(CopiesRequested(sid(), ("a", "b", "zzz"), 3))
    client.handle(CopiesRequested(sid(), ("c",), 2))
    client.handle(SchedulerDisconnected(sid()))
    ev = SchedulerConnected(sid(), recovering=True)
    assert client.handle(ev) == [
        SendTasks(ev.stimulus_id, ("a", "b", "c"), ("a", "c")),
        RequestReplicas(ev.stimulus_id, ("c",), 2),
        RequestReplicas(ev.stimulus_id, ("a",), 3),
    ]


def test_replicate_with_n_one_ends_the_request(client):
    """CopiesRequested n=1 forgets the key's copies; unknown keys are not remembered."""
    running(client, "a")
    assert client.handle(CopiesRequested(sid(), ("a", "nope"), 2)) == []
    assert client.replicas == {"a": 2}
    assert client.handle(CopiesRequested(sid(), ("a",), 1)) == []
    assert client.replicas == {}


def test_scattered_data_is_kept_as_lineage_without_a_function(client):
    """ValuesScattered: the marker joins the lineage; nothing goes out (the scatter request carries the data)."""
    connect(client)
    client.handle(HandlesMade(sid(), ("s",)))
    assert client.handle(ValuesScattered(sid(), ("s",), (Kept(function_id=None),))) == []
    assert list(client.lineage.tasks) == ["s"] and client.lineage.functions == {}


# --------------------------------------------------------------- handles --


def test_the_last_handle_dropped_releases_the_key_and_its_lineage(client):
    """HandlesDropped to zero: record, lineage and copies go; SendReleaseKeys names the key once."""
    running(client, "x")
    client.handle(HandlesMade(sid(), ("x",)))
    client.handle(CopiesRequested(sid(), ("x",), 2))
    assert client.handle(HandlesDropped(sid(), ("x",))) == []  # one handle left
    ev = HandlesDropped(sid(), ("x", "unknown"))
    assert client.handle(ev) == [SendReleaseKeys(ev.stimulus_id, ("x",))]
    assert client.futures == {} and not client.lineage and client.replicas == {}


def test_an_input_stays_in_the_lineage_while_a_held_dependent_needs_it(client):
    """Dropping x keeps its task while y (held) depends on it; dropping y drops both."""
    running(client, "x")
    submit(client, "y", "x")
    ev = HandlesDropped(sid(), ("x",))
    assert client.handle(ev) == [SendReleaseKeys(ev.stimulus_id, ("x",))]
    assert list(client.lineage.tasks) == ["x", "y"]
    client.handle(HandlesDropped(sid(), ("y",)))
    assert not client.lineage


def test_a_function_is_kept_while_a_kept_task_calls_it(client):
    """Two tasks calling f: dropping one keeps f for the other; dropping the last drops f with it."""
    running(client, "x", "y")
    assert (len(client.lineage), client.lineage.functions) == (2, {"f": b"pickled f"})
    client.handle(HandlesDropped(sid(), ("x",)))
    assert (len(client.lineage), client.lineage.functions) == (1, {"f": b"pickled f"})
    client.handle(HandlesDropped(sid(), ("y",)))
    assert (len(client.lineage), client.lineage.functions) == (0, {})


def test_handles_dropped_while_away_are_forgotten_without_a_message(client):
    """Reconnecting: the record goes, nothing is sent (the resubmission leaves it out)."""
    running(client, "x")
    client.handle(SchedulerDisconnected(sid()))
    assert client.handle(HandlesDropped(sid(), ("x",))) == []
    assert client.futures == {}


# --------------------------------------------------------------- reports --


def test_a_finished_report_wakes_the_waiters_once(client):
    """FinishReported: FutureDone the first time; a second report updates holders silently."""
    running(client, "x")
    ev = FinishReported(sid(), "x", (W1,))
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]
    rec = client.futures["x"]
    assert (rec.status, rec.done(), rec.who_has, rec.value) == (FINISHED, True, (W1,), None)
    assert client.handle(FinishReported(sid(), "x", (W2,), b"value")) == []
    assert (rec.who_has, rec.value) == ((W2,), b"value")


def test_a_report_for_a_key_not_held_is_ignored(client):
    """A report that crossed our release changes nothing."""
    running(client)
    assert client.handle(FinishReported(sid(), "gone", (W1,))) == []
    assert client.handle(FailureReported(sid(), ("gone",), BOOM)) == []
    assert client.handle(LossReported(sid(), "gone")) == []
    assert client.futures == {}


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (BOOM, ERROR),
        (WorkerDeaths(key="x", deaths=3, last_worker=W1), ERROR),
        (DataLost(key="x"), LOST),
        (Cancelled("by someone"), CANCELLED),
    ],
)
def test_each_kind_of_failure_sets_its_status(client, failure, status):
    """FailureReported: the status follows the failure's kind, every key listed wakes, in order, and
    its version is bumped (a holders answer asked before the failure is stale)."""
    running(client, "x", "y")
    versions = [client.futures[k].version for k in "xy"]
    ev = FailureReported(sid(), ("y", "x"), failure)
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "y"), FutureDone(ev.stimulus_id, "x")]
    assert [(client.futures[k].status, client.futures[k].failure) for k in "xy"] == [(status, failure)] * 2
    assert all(client.futures[k].version > v for k, v in zip("xy", versions, strict=True))


def test_a_lost_value_makes_the_future_pending_again(client):
    """LossReported: not done, status lost, holders and value gone, version bumped; a new finish wakes again."""
    running(client, "x")
    client.handle(FinishReported(sid(), "x", (W1,), b"v"))
    rec = client.futures["x"]
    version = rec.version
    assert client.handle(LossReported(sid(), "x")) == []
    assert (rec.status, rec.done(), rec.who_has, rec.value) == (LOST, False, (), None)
    assert rec.version > version
    ev = FinishReported(sid(), "x", (W2,))
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]


def test_a_cluster_restart_cancels_every_future(client):
    """RestartReported: every record cancelled; only those not done yet wake."""
    running(client, "x", "y")
    client.handle(FinishReported(sid(), "x", (W1,)))
    ev = RestartReported(sid())
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "y")]
    assert [client.futures[k].status for k in "xy"] == [CANCELLED, CANCELLED]


def test_refused_tasks_fail_with_the_schedulers_reason(client):
    """RefusalReported: futures not done fail locally with a ValueError naming the reason."""
    running(client, "x", "y")
    client.handle(FinishReported(sid(), "y", (W1,)))
    ev = RefusalReported(sid(), ("x", "y"), "too many resources")
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]
    error = client.futures["x"].local_error
    assert isinstance(error, ValueError) and str(error) == "the scheduler refused the task: too many resources"
    assert client.futures["y"].status is FINISHED


def test_calls_refused_after_their_handles_were_made_fail_locally(client):
    """CallsRefused: a blocking client's handles, made before its loop found
    it could not take the tasks, fail with the given error; a key listed
    that is done is left as it is; nothing is sent."""
    running(client, "y")
    client.handle(FinishReported(sid(), "y", (W1,)))
    client.handle(HandlesMade(sid(), ("x",)))
    error = CommClosedError("client c could not take the task: the client is closing")
    ev = CallsRefused(sid(), ("x", "y"), error)
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]
    assert client.futures["x"].status is ERROR and client.futures["x"].local_error is error
    assert client.futures["y"].status is FINISHED


# ------------------------------------------------------- user's requests --


def test_cancel_fails_the_futures_and_tells_the_scheduler(client):
    """FuturesCancelled: held keys not done wake cancelled; one SendCancelKeys for the held ones."""
    running(client, "x", "y")
    client.handle(FinishReported(sid(), "y", (W1,)))
    ev = FuturesCancelled(sid(), ("x", "y", "unknown"), "no longer needed")
    assert client.handle(ev) == [
        FutureDone(ev.stimulus_id, "x"),
        SendCancelKeys(ev.stimulus_id, ("x", "y"), "no longer needed"),
    ]
    assert client.futures["x"].failure == Cancelled("no longer needed")
    assert client.futures["y"].status is FINISHED  # done already: left as it is


def test_cancel_while_away_sends_nothing(client):
    """Reconnecting: the futures fail, nothing is sent (the resubmission does not want them)."""
    running(client, "x")
    client.handle(SchedulerDisconnected(sid()))
    ev = FuturesCancelled(sid(), ("x",), "cancelled by the client")
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]
    assert client.wanted_again() == []


def test_a_cancelled_key_submitted_anew_is_pending_again(client):
    """HandlesMade on a cancelled record: pending, no failure."""
    running(client, "x")
    client.handle(FuturesCancelled(sid(), ("x",), "oops"))
    assert client.handle(HandlesMade(sid(), ("x",))) == []
    rec = client.futures["x"]
    assert (rec.status, rec.done(), rec.failure, rec.refs) == (PENDING, False, None, 2)


def test_a_failed_key_given_a_new_handle_stays_failed(client):
    """HandlesMade on an erred record changes nothing but the count (the same failed task)."""
    running(client, "x")
    client.handle(FailureReported(sid(), ("x",), BOOM))
    assert client.handle(HandlesMade(sid(), ("x",))) == []
    assert (client.futures["x"].status, client.futures["x"].done()) == (ERROR, True)


def test_fire_and_forget_goes_out_only_while_connected(client):
    """FiredAndForgotten: SendFireAndForget while running, nothing while away."""
    running(client, "x")
    ev = FiredAndForgotten(sid(), ("x",))
    assert client.handle(ev) == [SendFireAndForget(ev.stimulus_id, ("x",))]
    client.handle(SchedulerDisconnected(sid()))
    assert client.handle(FiredAndForgotten(sid(), ("x",))) == []


# -------------------------------------------------------------- fetching --


def test_a_holder_that_answered_missing_is_named_to_the_scheduler(client):
    """FetchFailed: a holder that answered "I do not have it" goes out in SendMissingData."""
    running(client, "x")
    ev = FetchFailed(sid(), lacking={"x": W1}, unreachable={})
    assert client.handle(ev) == [SendMissingData(ev.stimulus_id, "x", (W1,))]


def test_a_holder_that_did_not_answer_is_not_named(client):
    """FetchFailed: an unreachable holder is no proof the value is gone: nothing is sent.

    (The client used to name every holder it failed to fetch from; the
    scheduler then dropped a live, hung worker's copy.)
    """
    running(client, "x", "y")
    ev = FetchFailed(sid(), lacking={"y": W2}, unreachable={"x": W1})
    assert client.handle(ev) == [SendMissingData(ev.stimulus_id, "y", (W2,))]
    assert client.handle(FetchFailed(sid(), lacking={}, unreachable={"x": W1, "y": W2})) == []


def test_missing_data_is_not_sent_while_away_nor_for_keys_not_held(client):
    """FetchFailed while reconnecting, or for a released key: nothing."""
    running(client, "x")
    assert client.handle(FetchFailed(sid(), lacking={"gone": W1}, unreachable={})) == []
    client.handle(SchedulerDisconnected(sid()))
    assert client.handle(FetchFailed(sid(), lacking={"x": W1}, unreachable={})) == []


def test_holders_learned_apply_only_to_records_unchanged_since_the_question(client):
    """HoldersLearned: a current answer sets the holders; a stale one is dropped; none means lost."""
    running(client, "x", "y", "z")
    for key in "xyz":
        client.handle(FinishReported(sid(), key, (W1,)))
    asked = {k: client.futures[k].version for k in "xyz"}
    client.handle(FinishReported(sid(), "y", (W1,), b"came with a report"))  # overtook the answer
    ev = HoldersLearned(sid(), {"x": (asked["x"], (W2,)), "y": (asked["y"], ()), "z": (asked["z"], ())})
    assert client.handle(ev) == []
    x, y, z = (client.futures[k] for k in "xyz")
    assert (x.status, x.who_has) == (FINISHED, (W2,))
    assert (y.status, y.value) == (FINISHED, b"came with a report")
    assert (z.status, z.done()) == (LOST, False)


# ------------------------------------------------------------ connection --


def test_giving_up_fails_every_pending_future_with_the_clients_error(client):
    """GaveUp: futures not done fail locally and wake; the client is closing."""
    running(client, "x", "y")
    client.handle(FinishReported(sid(), "y", (W1,)))
    client.handle(SchedulerDisconnected(sid()))
    error = CommClosedError("lost the connection to the scheduler for good")
    ev = GaveUp(sid(), error)
    assert client.handle(ev) == [FutureDone(ev.stimulus_id, "x")]
    assert client.futures["x"].local_error is error and client.status is ClientStatus.CLOSING


def test_closing_releases_every_key_once(client):
    """ClosingRequested: SendReleaseKeys for every held key while connected; then nothing."""
    running(client, "x", "y")
    ev = ClosingRequested(sid())
    assert client.handle(ev) == [SendReleaseKeys(ev.stimulus_id, ("x", "y"))]
    assert client.handle(ClosingRequested(sid())) == []
    assert client.handle(SchedulerDisconnected(sid())) == []
    assert client.status is ClientStatus.CLOSING
    assert client.handle(ConnectionEnded(sid())) == []
    assert client.status is ClientStatus.CLOSED


def test_closing_while_away_sends_nothing(client):
    """ClosingRequested while reconnecting: nothing to send; the queue is dropped."""
    running(client, "x")
    client.handle(SchedulerDisconnected(sid()))
    submit(client, "y")
    assert client.handle(ClosingRequested(sid())) == []
    assert client.queued_while_away == 0


def test_a_first_connection_resubmits_nothing(client):
    """SchedulerConnected(recovering=False): running, no output."""
    assert connect(client) == []
    assert client.status is ClientStatus.RUNNING


def test_an_unknown_event_raises():
    """A (state, event) pair the machine does not know raises, not passes silently."""

    @dataclasses.dataclass(frozen=True)
    class Strange(SchedulerDisconnected):
        pass

    with pytest.raises(KeyError):
        ClientState().handle(Strange(sid()))
