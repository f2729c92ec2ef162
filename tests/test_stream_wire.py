"""Issue 9, one-row Stream messages read and answered at the wire level: a message of the common shape
(`wire.read_step`, `wire.session_key`) must read as protobuf decodes it, its answer must be the bytes
protobuf writes, and through the real server every message keeps its own answer, in its session's order,
whichever way it went (claimed and run as a block, or decoded by protobuf and run on its own)."""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatecast.service.servicer import _wire_matrices
from gatecast.service.wire import read_step, session_key
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, taylor_values
from tests.test_observe_batch import last_sequences
from tests.test_reliability_engine import RuntimeDouble, serve, taylor_repo, version
from tests.test_wire import _open, mutated

__all__ = ["taylor_repo"]  # the module fixture, shared

VALUES = taylor_values()
STREAM = "/gatecast.v1.Forecaster/Stream"


def _observe(sid: str, seq: int, row: np.ndarray) -> bytes:
    rows = pb.Matrix(rows=1, cols=row.size, values=row.ravel().tolist())
    return pb.ObserveRequest(session_id=sid, sequence=seq, rows=rows).SerializeToString()


def _read(data: bytes) -> tuple[str, int, np.ndarray] | None:
    """What the fast read takes from a message (id, sequence, the row's values), or None."""
    step = read_step(data)
    if step is None or session_key(data[2:34]) is None:
        return None
    seq, cols, _ = step
    return data[2:34].decode(), seq, np.frombuffer(data[len(data) - 4 * cols :], "<f4")


@pytest.mark.parametrize("seq", [1, 127, 128, 16384, 2**40, 2**62])
@pytest.mark.parametrize("cols", [1, 3, 30])
def test_a_one_row_message_reads_as_protobuf_decodes_it(seq: int, cols: int) -> None:
    sid = secrets.token_hex(16)
    row = np.random.default_rng(seq).normal(size=cols).astype(np.float32)
    data = _observe(sid, seq, row)
    got = _read(data)
    assert got is not None
    assert got[:2] == (sid, seq)
    np.testing.assert_array_equal(got[2], row)
    assert session_key(data[2:34]) == bytes.fromhex(sid)


def test_what_is_not_the_common_shape_is_left_to_protobuf() -> None:
    sid = secrets.token_hex(16)
    one = np.ones(1, np.float32)
    good = _observe(sid, 5, one)
    longer = bytearray(good)  # sequence 5 written in two bytes: decodes, but protobuf would answer with one
    longer[35:36] = b"\x85\x00"
    cases = {
        "sequence 0 (left out on the wire)": _observe(sid, 0, one),
        "sequence 0 written out": good[:35] + b"\x00" + good[36:],
        "a sequence written longer than it needs": bytes(longer),
        "a NaN": _observe(sid, 1, np.array([np.nan], np.float32)),
        "an infinity": _observe(sid, 1, np.array([0, -np.inf], np.float32)),
        "31 columns (a two-byte length)": _observe(sid, 1, np.ones(31, np.float32)),
        "two rows": pb.ObserveRequest(
            session_id=sid, sequence=1, rows=pb.Matrix(rows=2, cols=1, values=[1, 2])
        ).SerializeToString(),
        "a trailing unknown field": good + b"\x20\x01",
        "the fields in another order": good[34:] + good[:34],
        "cut short": good[:-1],
        "a short id": _observe(sid[:30], 1, one),
        "no rows": pb.ObserveRequest(session_id=sid, sequence=1).SerializeToString(),
        "empty": b"",
    }
    for what, data in cases.items():
        assert read_step(data) is None, what
    for what, chars in {"upper case": sid.upper(), "not hex": "g" * 32, "spaces": " " * 32}.items():
        data = _observe(chars, 1, one)
        assert read_step(data) is not None and session_key(data[2:34]) is None, what


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_bytes_are_read_as_protobuf_reads_them_or_left_to_it(data: st.DataObject) -> None:
    """Mutations of a one-row message: whatever the fast read accepts, protobuf decodes to the same id,
    sequence and row, and the answer written from its head is protobuf's bytes."""
    cols = data.draw(st.integers(1, 4))
    seq = data.draw(st.integers(1, 2**40))
    raw = mutated(data, _observe(secrets.token_hex(16), seq, np.arange(cols, dtype=np.float32)))
    got = _read(bytes(raw))
    if got is None:
        return
    req = pb.ObserveRequest.FromString(bytes(raw))  # raises if the fast read took what protobuf refuses
    assert (req.session_id, req.sequence) == got[:2]
    assert (req.rows.rows, req.rows.cols) == (1, len(got[2]))
    assert struct.pack(f"<{len(got[2])}f", *req.rows.values) == got[2].tobytes()
    step = read_step(bytes(raw))
    assert step is not None
    y = np.arange(24, dtype=np.float32).reshape(1, 24, 1) - 3.5
    written = bytes(raw[: step[2]]) + _wire_matrices(0x1A, y)[0]
    expected = pb.StreamResponse(
        session_id=req.session_id, sequence=req.sequence, forecast=pb.Matrix(rows=24, cols=1, values=y[0].ravel())
    )
    assert written == expected.SerializeToString()


def test_an_answer_with_quantiles_is_the_bytes_protobuf_writes() -> None:
    rng = np.random.default_rng(3)
    sid = secrets.token_hex(16)
    data = _observe(sid, 300, np.ones(2, np.float32))
    step = read_step(data)
    assert step is not None
    y = rng.normal(size=(2, 24, 2)).astype(np.float32)
    q = rng.normal(size=(2, 24, 2, 3)).astype(np.float32)
    ys = _wire_matrices(0x1A, y)
    qs = _wire_matrices(0x2A, q.reshape(2, 24, -1))
    for k in range(2):
        expected = pb.StreamResponse(
            session_id=sid,
            sequence=300,
            forecast=pb.Matrix(rows=24, cols=2, values=y[k].ravel().tolist()),
            quantile_forecast=pb.Matrix(rows=24, cols=6, values=q[k].ravel().tolist()),
        )
        assert data[: step[2]] + ys[k] + qs[k] == expected.SerializeToString()


# --- through the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(taylor_repo: Path) -> Iterator[RunningServer]:
    with serve(taylor_repo, max_stream_inflight=64) as s:
        yield s


@pytest.fixture()
def stub(srv: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.ForecasterStub(ch)


def _row(t: int, k: int) -> np.ndarray:
    return np.asarray(VALUES[2000 + 41 * k + t : 2001 + 41 * k + t], np.float32).ravel()


def _one_row(sid: str, t: int, k: int) -> pb.ObserveRequest:
    return pb.ObserveRequest(session_id=sid, sequence=t, rows=matrix(VALUES[2000 + 41 * k + t : 2001 + 41 * k + t]))


def _raw_stream(srv: RunningServer, messages: list[bytes]) -> list[bytes]:
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.stream_stream(STREAM, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return list(call(iter(messages), timeout=60))


def _steps(srv: RunningServer, path: str) -> float:
    value = srv.app.metrics.registry.get_sample_value("gatecast_batch_steps_total", {"rpc": "Stream", "path": path})
    assert value is not None  # exported from the start
    return value


def _rounds(srv: RunningServer, rounds: list[list[bytes]]) -> list[bytes]:
    """One stream: each round's messages written at once, then its answers read (the benchmark's loop)."""

    async def run() -> list[bytes]:
        got: list[bytes] = []
        async with grpc.aio.insecure_channel(srv.address) as ch:
            call = ch.stream_stream(STREAM, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
            for messages in rounds:
                for m in messages:
                    await call.write(m)
                got += [await call.read() for _ in messages]
            await call.done_writing()
        return got

    return asyncio.run(run())


@pytest.mark.parametrize("pipelined", [False, True])
def test_one_row_steps_run_as_blocks_and_answer_like_single_observes(
    stub: pb_grpc.ForecasterStub, srv: RunningServer, pipelined: bool
) -> None:
    """A round of one step per session at a time: every step is claimed and run as part of a block; or every
    message sent at once (a session's next step then often finds its turn held, and goes the single way
    after it). Either way each answer is the bytes protobuf writes for the forecast a single Observe of a
    twin session gives, in the session's order."""
    n, rounds = 10, 6
    streamed = [_open(stub, 200 * k) for k in range(n)]
    twins = [_open(stub, 200 * k) for k in range(n)]
    plan = [[_observe(streamed[k], t, _row(t, k)) for k in range(n)] for t in range(1, rounds + 1)]
    assert all(_read(m) is not None for r in plan for m in r)  # this test is about that path
    block, single = _steps(srv, "block"), _steps(srv, "single")
    replies = _raw_stream(srv, [m for r in plan for m in r]) if pipelined else _rounds(srv, plan)
    ran = (_steps(srv, "block") - block, _steps(srv, "single") - single)
    if pipelined:
        assert sum(ran) == n * rounds and ran[0] >= n, ran  # each step counted once; the first round as blocks
    else:
        assert ran == (n * rounds, 0)  # none went alone
    got: dict[str, list[pb.StreamResponse]] = {s: [] for s in streamed}
    for raw in replies:
        r = pb.StreamResponse.FromString(raw)
        assert r.SerializeToString() == raw  # protobuf's own bytes for what it read
        assert r.WhichOneof("result") == "forecast", r.error.message
        got[r.session_id].append(r)
    for k, sid in enumerate(streamed):
        assert [r.sequence for r in got[sid]] == list(range(1, rounds + 1))  # in the session's order
        for t, r in enumerate(got[sid], start=1):
            alone = stub.Observe(_one_row(twins[k], t, k)).forecast
            np.testing.assert_allclose(array(r.forecast), array(alone), rtol=1e-6, atol=1e-6)


def test_every_message_of_a_pipelined_stream_gets_its_own_answer(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """Messages that cannot be claimed (a session's second step in flight, a retry, errors of every kind,
    bytes that are no message) each get their own answer, in their session's order, and the stream goes on."""
    a, b, gone = (_open(stub, 300 * k) for k in range(3))
    stub.CloseSession(pb.CloseSessionRequest(session_id=gone))
    messages = [
        _observe(a, 1, _row(1, 0)),  # claimed
        _observe(a, 2, _row(2, 0)),  # a's turn is held: the single way, after step 1
        _observe(b, 1, _row(1, 1)),  # claimed
        b"\xff\xff\xff\xff",  # not a message
        _observe(a, 2, _row(2, 0)),  # a retry of step 2 (same rows): its stored answer
        _observe(a, 2, _row(5, 0)),  # step 2 again with other rows
        _observe(a, 5, _row(5, 0)),  # out of order
        _observe(b, 2, np.ones(3, np.float32)),  # the wrong feature count
        _observe(b, 2, np.array([np.nan], np.float32)),  # not finite
        _observe(gone, 1, _row(1, 2)),  # closed
        _observe("0" * 32, 1, _row(1, 2)),  # never existed
        _observe(a.upper(), 3, _row(3, 0)),  # a malformed id
        b"\x0a\x20" + b"\xff" * 32 + _observe(a, 3, _row(3, 0))[34:],  # an id that is not UTF-8: no message
        _observe(b, 2, _row(2, 1)),  # fine: b's next step
        _observe(a, 3, _row(3, 0)),  # fine: a's next step
    ]
    replies = [pb.StreamResponse.FromString(r) for r in _raw_stream(srv, messages)]
    assert len(replies) == len(messages)
    g = grpc.StatusCode

    def kinds(sid: str) -> list[tuple[int, int]]:
        return [(r.sequence, r.error.code) for r in replies if r.session_id == sid]

    assert kinds(a) == [
        (1, 0),
        (2, 0),
        (2, 0),
        (2, g.FAILED_PRECONDITION.value[0]),
        (5, g.FAILED_PRECONDITION.value[0]),
        (3, 0),
    ]
    assert kinds(b) == [(1, 0), (2, g.INVALID_ARGUMENT.value[0]), (2, g.INVALID_ARGUMENT.value[0]), (2, 0)]
    assert kinds(gone) == [(1, g.NOT_FOUND.value[0])]
    assert kinds("0" * 32) == [(1, g.NOT_FOUND.value[0])]
    assert kinds(a.upper()) == [(3, g.INVALID_ARGUMENT.value[0])]
    undecodable = [r for r in replies if not r.session_id]
    assert len(undecodable) == 2
    assert all("not a valid gatecast.v1.ObserveRequest" in r.error.message for r in undecodable)
    by_a = [r for r in replies if r.session_id == a]
    assert by_a[1].forecast == by_a[2].forecast  # the retry answers what step 2 answered
    assert "already applied with different rows" in by_a[3].error.message
    assert "expected 3" in by_a[4].error.message
    assert last_sequences(srv, [a, b]) == [3, 2]


def test_a_cancelled_pipelined_stream_leaves_every_session_consistent(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """Steps sent far ahead (claimed, or waiting for their session's turn), and the client goes away after a
    few answers: every session applied a prefix of its steps, none is left holding its turn, and each
    continues exactly like a twin that applied as many."""
    n, rounds = 8, 20
    streamed = [_open(stub, 250 * k) for k in range(n)]
    twins = [_open(stub, 250 * k) for k in range(n)]

    async def run() -> None:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            call = ch.stream_stream(STREAM, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
            for t in range(1, rounds + 1):
                for k in range(n):
                    await call.write(_observe(streamed[k], t, _row(t, k)))
            for _ in range(2 * n):
                await call.read()
            call.cancel()

    # every model run slowed to 20 ms: the 20 rounds need at least 400 ms, the client goes away after about
    # two rounds (on a fast machine the server used to apply all of them before the cancel arrived)
    with RuntimeDouble(version(srv)) as rt:
        rt.delay = 0.02
        asyncio.run(run())
        time.sleep(0.5)  # the steps the server had started finish (and are recorded)
    applied = last_sequences(srv, streamed)
    assert all(1 <= s <= rounds for s in applied) and min(applied) < rounds, applied  # not all of them
    for k, (sid, twin) in enumerate(zip(streamed, twins, strict=True)):
        for t in range(1, applied[k] + 1):
            stub.Observe(_one_row(twin, t, k))
        nxt = applied[k] + 1
        mine = stub.Observe(_one_row(sid, nxt, k), timeout=10).forecast  # its turn was given back
        theirs = stub.Observe(_one_row(twin, nxt, k)).forecast
        np.testing.assert_allclose(array(mine), array(theirs), rtol=1e-6, atol=1e-6)
