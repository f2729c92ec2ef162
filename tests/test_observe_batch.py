"""Issue 9, many sessions per message, against the real server on loopback: ObserveBatch and StreamBatch
answer each step as a single Observe would (retries, errors, order), a bad step fails only itself, limits
are named, and a StreamBatch cancelled mid-way leaves every session consistent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, taylor_values
from tests.test_reliability_engine import serve, taylor_repo

__all__ = ["taylor_repo"]  # the module fixture, shared

MAX_STEPS = 16
VALUES = taylor_values()


@pytest.fixture(scope="module")
def srv(taylor_repo: Path) -> Iterator[RunningServer]:
    with serve(taylor_repo, max_batch_steps=MAX_STEPS, max_stream_inflight=32) as s:
        yield s


@pytest.fixture()
def stub(srv: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.ForecasterStub(ch)


def _open(stub: pb_grpc.ForecasterStub, start: int, n: int = 200) -> str:
    history = matrix(VALUES[start : start + n])
    return str(stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history)).session_id)


def _rows(k: int, t: int) -> np.ndarray:
    """Session k's rows for its sequence t: different for every session and step."""
    return VALUES[1000 + 37 * k + t : 1001 + 37 * k + t + (k % 3)]


def _step(sid: str, t: int, k: int) -> pb.ObserveRequest:
    return pb.ObserveRequest(session_id=sid, sequence=t, rows=matrix(_rows(k, t)))


def _twins(stub: pb_grpc.ForecasterStub, n: int) -> tuple[list[str], list[str]]:
    """n sessions with different histories, and a twin of each opened on the same history."""
    starts = [300 * k for k in range(n)]
    return [_open(stub, s) for s in starts], [_open(stub, s) for s in starts]


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def cancel_after_answers(address: str, messages: Iterator[pb.ObserveBatchRequest], answers: int) -> None:
    """A StreamBatch that sends `messages` as fast as flow control lets it and goes away after `answers`
    answers; returns once the server has had time to finish (and commit) the steps it had started."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            call = pb_grpc.ForecasterStub(ch).StreamBatch(messages)
            for _ in range(answers):
                await call.read()
            call.cancel()

    asyncio.run(run())
    time.sleep(0.5)


def last_sequences(srv: RunningServer, session_ids: list[str]) -> list[int]:
    async def read() -> list[int]:
        return [srv.app.sessions.get(s).last_seq for s in session_ids]

    return srv.call(read())  # type: ignore[no-any-return]


def test_observe_batch_answers_equal_single_observes(stub: pb_grpc.ForecasterStub) -> None:
    n = 6
    batched, single = _twins(stub, n)
    rng = np.random.default_rng(0)
    for t in range(1, 5):
        order = rng.permutation(n)  # answers follow the request's order, whatever it is
        reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=[_step(batched[k], t, k) for k in order]))
        assert [r.session_id for r in reply.results] == [batched[k] for k in order]
        for r, k in zip(reply.results, order, strict=True):
            assert r.WhichOneof("result") == "forecast" and r.sequence == t
            _close(array(r.forecast), array(stub.Observe(_step(single[k], t, k)).forecast))


def test_stream_batch_answers_equal_single_observes_in_message_order(stub: pb_grpc.ForecasterStub) -> None:
    n, rounds = 5, 6
    batched, single = _twins(stub, n)
    messages = [pb.ObserveBatchRequest(steps=[_step(batched[k], t, k) for k in range(n)]) for t in range(1, rounds + 1)]
    replies = list(stub.StreamBatch(iter(messages), timeout=60))
    assert len(replies) == rounds
    for t, reply in enumerate(replies, start=1):
        assert [(r.session_id, r.sequence) for r in reply.results] == [(s, t) for s in batched]
        for k, r in enumerate(reply.results):
            _close(array(r.forecast), array(stub.Observe(_step(single[k], t, k)).forecast))


def test_one_session_twice_in_a_message_applies_in_order(stub: pb_grpc.ForecasterStub) -> None:
    (a,), (twin,) = _twins(stub, 1)
    steps = [_step(a, 1, 0), _step(a, 2, 0), _step(a, 2, 0), _step(a, 4, 0)]
    reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=steps))
    first, second = (array(stub.Observe(_step(twin, t, 0)).forecast) for t in (1, 2))
    _close(array(reply.results[0].forecast), first)
    _close(array(reply.results[1].forecast), second)
    np.testing.assert_array_equal(array(reply.results[2].forecast), array(reply.results[1].forecast))  # a retry
    assert reply.results[3].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "expected 3" in reply.results[3].error.message


def test_each_step_has_its_own_error_and_the_others_succeed(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    (a, b, c, gone), _ = _twins(stub, 4)
    applied = stub.Observe(_step(a, 1, 0)).forecast
    stub.CloseSession(pb.CloseSessionRequest(session_id=gone))
    other = pb.ObserveRequest(session_id=a, sequence=1, rows=matrix(VALUES[5:6]))
    wide = pb.ObserveRequest(session_id=c, sequence=1, rows=matrix(np.ones((1, 3), np.float32)))
    steps = [
        _step(a, 1, 0),  # a retry: the stored answer
        other,  # the same sequence with other rows
        _step(b, 1, 1),  # fine
        _step(gone, 1, 3),  # closed
        _step("0" * 32, 1, 3),  # never existed
        pb.ObserveRequest(session_id="nope", sequence=1, rows=matrix(VALUES[:1])),  # malformed id
        wide,  # three columns for a one-feature model
        _step(b, 5, 1),  # out of order
        _step(c, 1, 2),  # fine, after c's refused step
    ]
    reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=steps), timeout=30)
    codes = [r.error.code if r.WhichOneof("result") == "error" else 0 for r in reply.results]
    g = grpc.StatusCode
    expected = [0, g.FAILED_PRECONDITION, 0, g.NOT_FOUND, g.NOT_FOUND, g.INVALID_ARGUMENT, g.INVALID_ARGUMENT]
    assert codes == [0 if e == 0 else e.value[0] for e in expected] + [g.FAILED_PRECONDITION.value[0], 0]  # type: ignore[union-attr]
    assert [r.session_id for r in reply.results] == [s.session_id for s in steps]
    np.testing.assert_array_equal(array(reply.results[0].forecast), array(applied))
    assert "already applied with different rows" in reply.results[1].error.message
    assert "expected 2" in reply.results[7].error.message
    assert "1 feature" in reply.results[6].error.message

    # an expired session: NOT_FOUND for its step, the others go on
    async def age() -> int:
        srv.app.sessions.get(b).last_used = time.monotonic() - 10 * srv.app.sessions.idle_s
        return srv.app.sessions.expire()

    assert srv.call(age()) == 1
    reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=[_step(b, 2, 1), _step(c, 2, 2)]))
    assert reply.results[0].error.code == g.NOT_FOUND.value[0] and "expired" in reply.results[0].error.message
    assert reply.results[1].WhichOneof("result") == "forecast"


def test_a_message_whose_only_one_row_steps_are_misshapen_answers_each_its_error(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """Found by a hostile client: when no one-row step of a version had the model's width (a row declared
    1x1 with no values, or two values for one column), the whole message answered INTERNAL, and a step of
    another version earlier in the same message was applied though nobody was told."""
    (d, e), _ = _twins(stub, 2)
    empty = pb.ObserveRequest(session_id=d, sequence=1, rows=pb.Matrix(rows=1, cols=1))
    two = pb.ObserveRequest(session_id=e, sequence=1, rows=pb.Matrix(rows=1, cols=1, values=[1.0, 2.0]))
    g = grpc.StatusCode
    for steps in ([empty], [empty, two]):
        reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=steps), timeout=30)
        assert [r.error.code for r in reply.results] == [g.INVALID_ARGUMENT.value[0]] * len(steps), reply
        streamed = list(stub.StreamBatch(iter([pb.ObserveBatchRequest(steps=steps)]), timeout=30))
        assert [r.error.code for r in streamed[0].results] == [g.INVALID_ARGUMENT.value[0]] * len(steps)
    assert last_sequences(srv, [d, e]) == [0, 0]  # nothing applied
    assert stub.Observe(_step(d, 1, 0)).forecast.rows > 0  # and the sessions go on from sequence 1


def test_limits_and_refused_messages(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    (a,), _ = _twins(stub, 1)
    too_many = pb.ObserveBatchRequest(steps=[_step(a, 1, 0)] * (MAX_STEPS + 1))
    for request, said in ((too_many, f"at most {MAX_STEPS}"), (pb.ObserveBatchRequest(), "no steps")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ObserveBatch(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert said in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ObserveBatch(too_many)
    assert f"{MAX_STEPS + 1} steps" in err.value.details() and "GATECAST_MAX_BATCH_STEPS" in err.value.details()
    # on a stream: the refused message is answered with its error, and the stream goes on
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.stream_stream("/gatecast.v1.Forecaster/StreamBatch")
        good = pb.ObserveBatchRequest(steps=[_step(a, 1, 0)]).SerializeToString()
        raw = [too_many.SerializeToString(), b"\xff\xff\xff\xff", b"", good]
        replies = [pb.ObserveBatchResponse.FromString(r) for r in call(iter(raw), timeout=30)]
    assert [r.error.code for r in replies[:3]] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3
    assert "GATECAST_MAX_BATCH_STEPS" in replies[0].error.message and not replies[0].results
    assert "not a valid gatecast.v1.ObserveBatchRequest" in replies[1].error.message
    assert replies[3].results[0].WhichOneof("result") == "forecast" and not replies[3].HasField("error")


def test_a_cancelled_stream_batch_leaves_every_session_consistent(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """The client goes away after a few answers: each session has applied some prefix of its steps, its
    sequence number says how many, and it continues exactly like a twin that applied the same steps."""
    n, rounds = 8, 60
    batched, single = _twins(stub, n)
    steps = ([_step(batched[k], t, k) for k in range(n)] for t in range(1, rounds))
    cancel_after_answers(srv.address, (pb.ObserveBatchRequest(steps=s) for s in steps), 3)
    applied = last_sequences(srv, batched)
    assert all(3 <= k < rounds for k in applied), applied
    for k, (sid, twin) in enumerate(zip(batched, single, strict=True)):
        for t in range(1, applied[k] + 1):
            stub.Observe(_step(twin, t, k))
        nxt = applied[k] + 1
        _close(array(stub.Observe(_step(sid, nxt, k)).forecast), array(stub.Observe(_step(twin, nxt, k)).forecast))


def test_a_stream_batch_that_never_reads_is_held_back(srv: RunningServer) -> None:
    """The client writes 300 messages of 16 steps and reads nothing: the server stops reading once
    max_stream_inflight (32) steps are unanswered and flow control holds the answers it wrote, instead of
    applying every step. Once the client reads, everything is answered."""
    n, rounds = MAX_STEPS, 300
    with grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        ids = [str(stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id) for _ in range(n)]
        messages = (
            pb.ObserveBatchRequest(
                steps=[pb.ObserveRequest(session_id=s, sequence=t, rows=matrix(VALUES[t : t + 1])) for s in ids]
            )
            for t in range(1, rounds + 1)
        )
        replies = stub.StreamBatch(messages, timeout=120)

        async def applied() -> int:
            return sum(srv.app.sessions.get(s).last_seq for s in ids)

        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.5:  # until the server stops making progress
            now = srv.call(applied())
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.05)
        print(f"\nsteps applied while the client read nothing: {last} of {n * rounds}")
        assert last < 1500, f"{last} of {n * rounds} steps applied for a client that reads nothing"
        got = list(replies)
    assert [len(m.results) for m in got] == [n] * rounds
    assert all(r.WhichOneof("result") == "forecast" for m in got for r in m.results)
    assert srv.call(applied()) == n * rounds
