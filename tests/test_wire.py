"""Issue 9, the batch RPCs read and answered at the wire level (service.wire): a uniform message (one row per
step, ids and sequences of one width) is read as arrays, and must give exactly what protobuf's decoding
gives; its answer must be the bytes protobuf would write; and through the real server, every step of a
uniform message is answered as a single Observe would answer it, errors included."""

from __future__ import annotations

import queue
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatecast import SESSION_HEADER
from gatecast.service import wire
from gatecast.service.sessions import HELD
from gatecast.service.wire import Uniform, answers
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, taylor_values
from tests.test_observe_batch import cancel_after_answers, last_sequences
from tests.test_reliability_engine import RuntimeDouble, serve, taylor_repo, version, wait_for

__all__ = ["taylor_repo"]  # the module fixture, shared

VALUES = taylor_values()


def _message(ids: list[str], seqs: list[int], rows: np.ndarray) -> bytes:
    steps = [
        pb.ObserveRequest(session_id=i, sequence=s, rows=pb.Matrix(rows=1, cols=r.size, values=r.ravel().tolist()))
        for i, s, r in zip(ids, seqs, rows, strict=True)
    ]
    return pb.ObserveBatchRequest(steps=steps).SerializeToString()


def _as_protobuf_reads(data: bytes) -> tuple[list[str], list[int], np.ndarray] | None:
    try:
        req = pb.ObserveBatchRequest.FromString(data)
    except Exception:
        return None
    ids = [s.session_id for s in req.steps]
    seqs = [s.sequence for s in req.steps]
    values = [list(s.rows.values) for s in req.steps]
    return ids, seqs, np.array(values, np.float32) if values else np.zeros((0, 0), np.float32)


@pytest.mark.parametrize("seq", [1, 127, 128, 16384, 2**40, 2**62])
@pytest.mark.parametrize("cols", [1, 3])
def test_a_uniform_message_reads_as_protobuf_decodes_it(seq: int, cols: int) -> None:
    rng = np.random.default_rng(seq)
    ids = [secrets.token_hex(16) for _ in range(40)]
    rows = rng.normal(size=(40, cols)).astype(np.float32)
    data = _message(ids, [seq] * 40, rows)
    u = Uniform.parse(data)
    assert u is not None
    assert [w.tobytes().hex() for w in u.words] == ids
    assert u.seqs.tolist() == [seq] * 40
    np.testing.assert_array_equal(u.x[:, 0, :], rows)


@pytest.mark.parametrize("n", [1, 3, wire.FIXED_RECORDS, wire.FIXED_RECORDS + 1])
def test_messages_of_any_length_are_checked_record_by_record(n: int) -> None:
    """Whatever the number of records (the cached template covers FIXED_RECORDS; longer messages are checked
    another way), a uniform message reads as protobuf reads it, and one record off in a fixed byte (here the
    last record's sequence tag) is not uniform."""
    ids = [secrets.token_hex(16) for _ in range(n)]
    rows = np.arange(n, dtype=np.float32)[:, None]
    data = _message(ids, [5] * n, rows)
    u = Uniform.parse(data)
    assert u is not None and len(u.seqs) == n
    np.testing.assert_array_equal(u.x.ravel(), rows.ravel())
    off = bytearray(data)
    off[len(off) - u.layout.stride + 36] = 0x18  # the last record's sequence tag: field 3 instead of 2
    assert Uniform.parse(bytes(off)) is None


def test_the_uniform_check_keeps_bounded_templates() -> None:
    """Found in review: templates were kept per record count, so messages of ever new lengths (up to the
    message size limit) held unbounded memory. Now one per layout, of FIXED_RECORDS records, at most
    FIXED_LAYOUTS of them."""
    wire._FIXED.clear()
    a = secrets.token_hex(16)
    for cols in range(1, 12):
        for seq in (1, 200, 70000):  # sequences of 1, 2 and 3 bytes: three layouts per width
            for n in (1, 5, 40):
                assert Uniform.parse(_message([a] * n, [seq] * n, np.ones((n, cols), np.float32))) is not None
    assert len(wire._FIXED) <= wire.FIXED_LAYOUTS
    assert all(len(fixed) <= wire.FIXED_RECORDS * 129 for _, fixed in wire._FIXED.values())


def test_what_is_not_uniform_is_left_to_protobuf() -> None:
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    one = np.ones((1, 1), np.float32)
    cases = {
        "sequences of two widths": _message([a, b], [1, 200], np.ones((2, 1), np.float32)),
        "an upper-case id": _message([a.upper()], [1], one),
        "a short id": _message([a[:30]], [1], one),
        "sequence 0 (left out on the wire)": _message([a], [0], one),
        "two rows": pb.ObserveBatchRequest(
            steps=[pb.ObserveRequest(session_id=a, sequence=1, rows=pb.Matrix(rows=2, cols=1, values=[1, 2]))]
        ).SerializeToString(),
        "a trailing unknown field": _message([a], [1], one) + b"\x18\x01",
        "a second record cut short": _message([a, b], [1, 1], np.ones((2, 1), np.float32))[:-1],
        "empty": b"",
    }
    bad_cols = bytearray(_message([a], [1], one))
    bad_cols[-7] = 64  # the Matrix's cols byte: 4 * 64 values' bytes would not fit the length byte (found by fuzzing)
    cases["a column count whose values cannot fit"] = bytes(bad_cols)
    for what, data in cases.items():
        assert Uniform.parse(data) is None, what
    # a non-minimal varint (1 written in two bytes) decodes, but protobuf would answer it with one byte:
    # left to protobuf, so that a uniform answer is always protobuf's bytes (found in review)
    longer = bytearray(_message([a], [1], one))
    at = longer.index(b"\x10\x01")
    longer[at : at + 2] = b"\x10\x81\x00"
    longer[1] += 1  # the record is one byte longer
    assert pb.ObserveBatchRequest.FromString(bytes(longer)).steps[0].sequence == 1
    assert Uniform.parse(bytes(longer)) is None
    # steps too short for an id and a sequence, which protobuf decodes (an IndexError before: found in review)
    cases["an empty step"] = b"\x0a\x00"
    cases["a step with only its id"] = b"\x0a\x22\x0a\x20" + a.encode()
    for what in ("an empty step", "a step with only its id"):
        assert len(pb.ObserveBatchRequest.FromString(cases[what]).steps) == 1, what  # valid protobuf
        assert Uniform.parse(cases[what]) is None, what


@settings(max_examples=300, deadline=None)
def mutated(data: st.DataObject, message: bytes) -> bytes:
    """`message` with 1 to 4 bytes replaced, inserted or deleted, then cut anywhere."""
    raw = bytearray(message)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        edit = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if edit == "replace":
            raw[at] = data.draw(st.integers(0, 255))
        elif edit == "insert":
            raw.insert(at, data.draw(st.integers(0, 255)))
        elif len(raw) > 1:
            del raw[at]
    raw = raw[: data.draw(st.integers(0, len(raw)))]  # and cut anywhere
    return bytes(raw)


@given(st.data())
def test_any_bytes_are_read_as_protobuf_reads_them_or_left_to_it(data: st.DataObject) -> None:
    """Mutations of a uniform message: whatever `Uniform.parse` accepts, protobuf decodes to the same
    ids, sequences and values."""
    n = data.draw(st.integers(1, 6))
    ids = [secrets.token_hex(16) for _ in range(n)]
    seq = data.draw(st.integers(1, 2**40))
    raw = mutated(data, _message(ids, [seq] * n, np.arange(n, dtype=np.float32).reshape(n, 1)))
    u = Uniform.parse(bytes(raw))
    if u is None:
        return
    decoded = _as_protobuf_reads(bytes(raw))
    assert decoded is not None, "read as uniform, but protobuf refuses it"
    got_ids, got_seqs, got_values = decoded
    assert [w.tobytes().hex() for w in u.words] == got_ids
    assert u.seqs.tolist() == got_seqs
    np.testing.assert_array_equal(u.x[:, 0, :].view(np.uint32), got_values.view(np.uint32))
    # and its answers are protobuf's bytes for those ids and sequences
    y = np.arange(len(got_ids) * 3, dtype=np.float32).reshape(-1, 3, 1)
    records, _ = answers(u, np.arange(len(got_ids)), y, None)
    expected = pb.ObserveBatchResponse(
        results=[
            pb.StreamResponse(
                session_id=i, sequence=q, forecast=pb.Matrix(rows=3, cols=1, values=y[k].ravel().tolist())
            )
            for k, (i, q) in enumerate(zip(got_ids, got_seqs, strict=True))
        ]
    )
    assert records == expected.SerializeToString()


@pytest.mark.parametrize("quantiles", [False, True])
def test_answers_are_the_bytes_protobuf_writes(quantiles: bool) -> None:
    rng = np.random.default_rng(1)
    ids = [secrets.token_hex(16) for _ in range(9)]
    u = Uniform.parse(_message(ids, [300] * 9, np.ones((9, 1), np.float32)))
    assert u is not None
    members = np.array([0, 2, 3, 8])
    y = rng.normal(size=(4, 24, 2)).astype(np.float32)
    q = rng.normal(size=(4, 24, 2, 3)).astype(np.float32) if quantiles else None
    records, size = answers(u, members, y, q)
    expected = pb.ObserveBatchResponse(
        results=[
            pb.StreamResponse(
                session_id=ids[i],
                sequence=300,
                forecast=pb.Matrix(rows=24, cols=2, values=y[k].ravel().tolist()),
                quantile_forecast=pb.Matrix(rows=24, cols=6, values=q[k].ravel().tolist()) if q is not None else None,
            )
            for k, i in enumerate(members)
        ]
    ).SerializeToString()
    assert records == expected and size * 4 == len(records)


# --- through the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(taylor_repo: Path) -> Iterator[RunningServer]:
    with serve(taylor_repo, max_batch_steps=64, max_stream_inflight=64) as s:
        yield s


@pytest.fixture()
def stub(srv: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.ForecasterStub(ch)


def _open(stub: pb_grpc.ForecasterStub, start: int) -> str:
    history = matrix(VALUES[start : start + 150])
    return str(stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history)).session_id)


def _one_row(sid: str, t: int, k: int) -> pb.ObserveRequest:
    return pb.ObserveRequest(session_id=sid, sequence=t, rows=matrix(VALUES[2000 + 41 * k + t : 2001 + 41 * k + t]))


def _steps_by_path(srv: RunningServer, rpc: str) -> tuple[float | None, float | None]:
    def value(path: str) -> float | None:
        return srv.app.metrics.registry.get_sample_value("gatecast_batch_steps_total", {"rpc": rpc, "path": path})

    return value("block"), value("single")


def test_uniform_stream_batch_answers_equal_single_observes(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    """The client sends every message at once (pipelined): each still runs as one block, after the one before."""
    n, rounds = 12, 5
    batched = [_open(stub, 200 * k) for k in range(n)]
    single = [_open(stub, 200 * k) for k in range(n)]
    messages = [
        pb.ObserveBatchRequest(steps=[_one_row(batched[k], t, k) for k in range(n)]) for t in range(1, rounds + 1)
    ]
    assert all(Uniform.parse(m.SerializeToString()) is not None for m in messages)  # this test is about that path
    block, one_by_one = _steps_by_path(srv, "StreamBatch")
    replies = list(stub.StreamBatch(iter(messages), timeout=60))
    assert block is not None and one_by_one is not None  # exported from the start
    assert _steps_by_path(srv, "StreamBatch") == (block + n * rounds, one_by_one)  # no step went the single way
    for t, reply in enumerate(replies, start=1):
        assert [(r.session_id, r.sequence) for r in reply.results] == [(s, t) for s in batched]
        for k, r in enumerate(reply.results):
            alone = stub.Observe(_one_row(single[k], t, k)).forecast
            np.testing.assert_allclose(array(r.forecast), array(alone), rtol=1e-6, atol=1e-6)


def test_every_step_of_a_uniform_message_gets_its_own_answer(stub: pb_grpc.ForecasterStub) -> None:
    a, b, c, d, gone, busy = (_open(stub, 300 * k) for k in range(6))
    applied = stub.Observe(_one_row(a, 1, 0)).forecast
    stub.CloseSession(pb.CloseSessionRequest(session_id=gone))
    same_seq_other_rows = pb.ObserveRequest(session_id=b, sequence=1, rows=matrix(VALUES[7:8]))
    stub.Observe(_one_row(b, 1, 1))
    nan = pb.ObserveRequest(session_id=d, sequence=1, rows=pb.Matrix(rows=1, cols=1, values=[float("nan")]))
    steps = [
        _one_row(a, 1, 0),  # a retry: the stored answer
        same_seq_other_rows,  # the same sequence with other rows
        _one_row(c, 1, 2),  # fine
        _one_row(gone, 1, 3),  # closed
        _one_row("0" * 32, 1, 3),  # never existed
        _one_row(c, 3, 2),  # c again, out of order (its step 2 is missing)
        nan,  # not finite
        _one_row(busy, 1, 5),  # fine
        _one_row(busy, 2, 5),  # the same session again: applies after its first step
        _one_row(a, 2, 0),  # fine: a's next step
    ]
    data = pb.ObserveBatchRequest(steps=steps).SerializeToString()
    assert Uniform.parse(data) is not None
    reply = stub.ObserveBatch(pb.ObserveBatchRequest.FromString(data), timeout=30)
    g = grpc.StatusCode
    codes = [r.error.code if r.WhichOneof("result") == "error" else 0 for r in reply.results]
    assert codes == [
        0,
        g.FAILED_PRECONDITION.value[0],
        0,
        g.NOT_FOUND.value[0],
        g.NOT_FOUND.value[0],
        g.FAILED_PRECONDITION.value[0],
        g.INVALID_ARGUMENT.value[0],
        0,
        0,
        0,
    ]
    assert [(r.session_id, r.sequence) for r in reply.results] == [(s.session_id, s.sequence) for s in steps]
    np.testing.assert_array_equal(array(reply.results[0].forecast), array(applied))
    assert "already applied with different rows" in reply.results[1].error.message
    assert "expected 2" in reply.results[5].error.message
    assert "NaN" in reply.results[6].error.message
    # busy's two steps applied in order: its next expected sequence is 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Observe(_one_row(busy, 4, 5))
    assert "expected 3" in err.value.details()


def test_a_uniform_message_with_the_wrong_feature_count_names_it(stub: pb_grpc.ForecasterStub) -> None:
    a = _open(stub, 0)
    wide = pb.ObserveRequest(session_id=a, sequence=1, rows=matrix(np.ones((1, 3), np.float32)))
    data = pb.ObserveBatchRequest(steps=[wide]).SerializeToString()
    assert Uniform.parse(data) is not None
    reply = stub.ObserveBatch(pb.ObserveBatchRequest.FromString(data))
    assert reply.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "1 feature" in reply.results[0].error.message
    assert stub.Observe(_one_row(a, 1, 0)).sequence == 1  # nothing was applied


def test_a_cancelled_pipelined_stream_leaves_every_session_consistent(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """Uniform messages sent ahead (so later ones wait for the one before) and the client goes away after
    three answers: every message ran whole or not at all, so all sessions applied the same prefix, and each
    continues exactly like a twin that applied the same steps."""
    n, rounds = 8, 60
    batched = [_open(stub, 250 * k) for k in range(n)]
    single = [_open(stub, 250 * k) for k in range(n)]
    messages = (pb.ObserveBatchRequest(steps=[_one_row(batched[k], t, k) for k in range(n)]) for t in range(1, rounds))
    cancel_after_answers(srv.address, messages, 3)
    applied = last_sequences(srv, batched)
    assert len(set(applied)) == 1 and 3 <= applied[0] < rounds - 1, applied  # whole messages, not all of them
    for k, (sid, twin) in enumerate(zip(batched, single, strict=True)):
        for t in range(1, applied[k] + 1):
            stub.Observe(_one_row(twin, t, k))
        nxt = applied[k] + 1
        mine, theirs = stub.Observe(_one_row(sid, nxt, k)).forecast, stub.Observe(_one_row(twin, nxt, k)).forecast
        np.testing.assert_allclose(array(mine), array(theirs), rtol=1e-6, atol=1e-6)


def test_a_pipelined_message_never_overtakes_one_read_before_it(stub: pb_grpc.ForecasterStub) -> None:
    """m2 names m1's sessions and waits for m1; m3 names those and one more: it must wait behind m2 rather
    than start at once (its steps for a and b would then reach the sessions before m2's and be refused)."""
    a, b, x = (_open(stub, 300 * k) for k in range(3))
    twins = [_open(stub, 300 * k) for k in range(3)]
    plan = [[(a, 1, 0), (b, 1, 1)], [(a, 2, 0), (b, 2, 1)], [(a, 3, 0), (b, 3, 1), (x, 1, 2)], [(x, 2, 2)]]
    messages = [pb.ObserveBatchRequest(steps=[_one_row(s, t, k) for s, t, k in m]) for m in plan]
    replies = list(stub.StreamBatch(iter(messages), timeout=60))
    got = [[(r.session_id, r.sequence, r.WhichOneof("result")) for r in reply.results] for reply in replies]
    assert got == [[(s, t, "forecast") for s, t, _ in m] for m in plan], got
    last = {s: r.forecast for reply in replies for r in reply.results for s in [r.session_id]}
    for (sid, twin), k, steps in zip(((a, twins[0]), (b, twins[1]), (x, twins[2])), range(3), (3, 3, 2), strict=True):
        for t in range(1, steps + 1):
            alone = stub.Observe(_one_row(twin, t, k)).forecast
        np.testing.assert_allclose(array(last[sid]), array(alone), rtol=1e-6, atol=1e-6)


def test_a_step_too_short_for_the_fast_read_gets_its_own_error(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """An empty step decodes (protobuf) and is that step's INVALID_ARGUMENT: on ObserveBatch, and on a
    stream that goes on to the next message (it ended the stream before: found in review)."""
    a = _open(stub, 0)
    raw = {"request_serializer": lambda b: b, "response_deserializer": pb.ObserveBatchResponse.FromString}
    with grpc.insecure_channel(srv.address) as ch:
        reply = ch.unary_unary("/gatecast.v1.Forecaster/ObserveBatch", **raw)(b"\x0a\x00", timeout=10)
        assert reply.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        good = [pb.ObserveBatchRequest(steps=[_one_row(a, t, 0)]).SerializeToString() for t in (1, 2)]
        replies = list(
            ch.stream_stream("/gatecast.v1.Forecaster/StreamBatch", **raw)(
                iter([good[0], b"\x0a\x00", good[1]]), timeout=10
            )
        )
    assert [r.results[0].WhichOneof("result") for r in replies] == ["forecast", "error", "forecast"]


def _stream_of(stub: pb_grpc.ForecasterStub, ids: list[str]) -> tuple[Callable[[list[int]], list[str | int]], Any]:
    """A StreamBatch kept open whose every message names `ids` (one uniform step each): send(seqs) sends one
    and returns each step's result ("forecast" or its error code); the second value ends the stream."""
    sent: queue.Queue[pb.ObserveBatchRequest | None] = queue.Queue()
    replies = stub.StreamBatch(iter(sent.get, None), timeout=60)

    def send(seqs: list[int]) -> list[str | int]:
        steps = [_one_row(sid, t, k) for k, (sid, t) in enumerate(zip(ids, seqs, strict=True))]
        assert Uniform.parse(pb.ObserveBatchRequest(steps=steps).SerializeToString()) is not None
        sent.put(pb.ObserveBatchRequest(steps=steps))
        reply = next(replies)
        return [r.error.code if r.WhichOneof("result") == "error" else "forecast" for r in reply.results]

    def end() -> None:
        sent.put(None)
        assert list(replies) == []

    return send, end


def _open_as(stub: pb_grpc.ForecasterStub, session_id: str | None = None) -> str:
    metadata = [(SESSION_HEADER, session_id)] if session_id is not None else None
    request = pb.OpenSessionRequest(model="taylor", history=matrix(VALUES[900:1050]))
    return str(stub.OpenSession(request, metadata=metadata).session_id)


def test_a_stream_never_steps_a_session_opened_where_one_it_named_was_closed(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """The server reuses where a stream's sessions were while no session has been removed since. Between two
    messages one session is closed and another opened in its freed slot, and one is closed and opened again
    under its own id (a new session, whose next sequence is 1): the closed one's step, although its sequence
    is the newcomer's next, is NOT_FOUND and never touches the newcomer; the reopened id starts over."""
    a, b, c = (_open(stub, 300 * k) for k in range(3))
    send, end = _stream_of(stub, [a, b, c])
    assert send([1, 1, 1]) == ["forecast"] * 3
    assert send([2, 2, 2]) == ["forecast"] * 3
    stub.CloseSession(pb.CloseSessionRequest(session_id=b))
    stub.CloseSession(pb.CloseSessionRequest(session_id=c))
    assert _open_as(stub, c) == c  # freed slots are handed out last-freed first: c's, then b's
    newcomer = _open_as(stub)
    g = grpc.StatusCode
    assert send([3, 1, 3]) == ["forecast", g.NOT_FOUND.value[0], g.FAILED_PRECONDITION.value[0]]
    assert send([4, 1, 1]) == ["forecast", g.NOT_FOUND.value[0], "forecast"]
    end()
    assert last_sequences(srv, [a, c, newcomer]) == [4, 1, 0]


def test_a_stream_finds_a_session_opened_after_it_was_named(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    """An id that was not a live session when a stream named it is looked up again in the next message."""
    a = _open(stub, 0)
    ghost = secrets.token_hex(16)
    send, end = _stream_of(stub, [a, ghost])
    assert send([1, 1]) == ["forecast", grpc.StatusCode.NOT_FOUND.value[0]]
    assert send([2, 1]) == ["forecast", grpc.StatusCode.NOT_FOUND.value[0]]
    assert _open_as(stub, ghost) == ghost
    assert send([3, 1]) == ["forecast", "forecast"]
    assert send([4, 2]) == ["forecast", "forecast"]
    end()
    assert last_sequences(srv, [a, ghost]) == [4, 2]


def test_blocks_of_many_streams_run_together_are_recorded_together_and_exactly(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    """While the model is held busy, three streams each send a uniform message; they run as one model run
    and are recorded together (one write per column for all of them): every answer, every retry of the same
    message (each session's stored answer and rows) and every session's next step equal those of twins
    stepped alone, and every turn is let go."""
    n = 4
    streams = [[_open(stub, 150 * (4 * j + k)) for k in range(n)] for j in range(3)]
    twins = [[_open(stub, 150 * (4 * j + k)) for k in range(n)] for j in range(3)]
    plug = _open(stub, 0)
    mv = version(srv)
    with RuntimeDouble(mv) as rt:
        rt.gate.clear()
        rt.started.clear()
        first = stub.Observe.future(_one_row(plug, 1, 0), timeout=30)  # holds the worker at the gate
        assert rt.started.wait(10)
        pending = [
            stub.ObserveBatch.future(
                pb.ObserveBatchRequest(steps=[_one_row(s, 1, 4 * j + k) for k, s in enumerate(ids)]), timeout=30
            )
            for j, ids in enumerate(streams)
        ]
        wait_for(lambda: mv.batcher.queued_rows == 3 * n + 1)  # the plug's row counts until it is delivered
        runs_before = len(rt.runs)
        rt.gate.set()
        replies = [p.result() for p in pending]
        first.result()
        assert rt.runs[runs_before] == (3 * n, 1)  # the three messages in one run
    for j, (ids, mine, reply) in enumerate(zip(twins, streams, replies, strict=True)):
        assert [r.session_id for r in reply.results] == mine
        retry = stub.ObserveBatch(pb.ObserveBatchRequest(steps=[_one_row(s, 1, 4 * j + k) for k, s in enumerate(mine)]))
        assert retry == reply
        for k, (twin, r) in enumerate(zip(ids, reply.results, strict=True)):
            alone = stub.Observe(_one_row(twin, 1, 4 * j + k)).forecast
            np.testing.assert_allclose(array(r.forecast), array(alone), rtol=1e-6, atol=1e-6)
            nxt = stub.Observe(_one_row(mine[k], 2, 4 * j + k)).forecast
            twin_nxt = stub.Observe(_one_row(twin, 2, 4 * j + k)).forecast
            np.testing.assert_allclose(array(nxt), array(twin_nxt), rtol=1e-6, atol=1e-6)
    flags = mv.pool.columns["flags"]
    assert not (flags & HELD).any()


def test_a_uniform_message_whose_run_fails_answers_each_step_and_applies_nothing(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    ids = [_open(stub, 200 * k) for k in range(5)]
    message = pb.ObserveBatchRequest(steps=[_one_row(s, 1, k) for k, s in enumerate(ids)])
    assert Uniform.parse(message.SerializeToString()) is not None
    with RuntimeDouble(version(srv)) as rt:
        rt.fail = lambda x: True
        reply = stub.ObserveBatch(message, timeout=30)
    assert [r.error.code for r in reply.results] == [grpc.StatusCode.INTERNAL.value[0]] * 5
    assert last_sequences(srv, ids) == [0] * 5
    again = stub.ObserveBatch(message, timeout=30)  # the turns were let go and nothing was recorded
    assert [r.WhichOneof("result") for r in again.results] == ["forecast"] * 5


def test_a_uniform_block_whose_recording_fails_answers_each_step_and_lets_go(
    stub: pb_grpc.ForecasterStub, srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording the block (after its run) raises: each step is answered INTERNAL, nothing is recorded and
    the state the run wrote is put back (a resend applies once: its forecast and the next are a twin's that
    never saw the failure), no turn stays held, and the stream goes on."""
    ids = [_open(stub, 200 * k) for k in range(3)]
    twins = [_open(stub, 200 * k) for k in range(3)]
    table = srv.app.sessions
    real = type(table).commit_block
    calls = []

    def boom(self: Any, *args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected commit failure")
        real(self, *args)

    monkeypatch.setattr(type(table), "commit_block", boom)
    send, end = _stream_of(stub, ids)
    assert send([1, 1, 1]) == [grpc.StatusCode.INTERNAL.value[0]] * 3
    assert not (version(srv).pool.columns["flags"] & HELD).any()
    assert last_sequences(srv, ids) == [0, 0, 0]
    assert send([2, 2, 2]) == [grpc.StatusCode.FAILED_PRECONDITION.value[0]] * 3  # 1 is still the next
    assert send([1, 1, 1]) == ["forecast"] * 3
    end()
    monkeypatch.setattr(type(table), "commit_block", real)
    for k, (sid, twin) in enumerate(zip(ids, twins, strict=True)):
        stub.Observe(_one_row(twin, 1, k))
        for mine, theirs in zip(_state(srv, sid), _state(srv, twin), strict=True):  # row 1 applied once
            np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)
        mine, theirs = stub.Observe(_one_row(sid, 2, k)).forecast, stub.Observe(_one_row(twin, 2, k)).forecast
        np.testing.assert_allclose(array(mine), array(theirs), rtol=1e-6, atol=1e-6)
    assert last_sequences(srv, ids) == [2, 2, 2]


def _state(srv: RunningServer, session_id: str) -> list[np.ndarray]:
    """A session's recurrent state as the pool holds it."""

    async def read() -> list[np.ndarray]:
        session = srv.app.sessions.get(session_id)
        return session.mv.pool.gather(np.array([session.slot]))

    return srv.call(read())  # type: ignore[no-any-return]


def test_a_release_that_fails_partway_never_hands_a_turn_on_twice(
    stub: pb_grpc.ForecasterStub, srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review. A block's steps are recorded, then letting go of its turns raises after it has
    handed a's turn to an Observe waiting for it. The block is answered (its steps are recorded), and a's
    turn is not let go a second time, which would let a pipelined message run a's step 2 beside the Observe:
    exactly one of the two applies it."""
    a, b = _open(stub, 0), _open(stub, 300)
    table = srv.app.sessions
    mv = version(srv)
    real = table.release_block
    calls: list[int] = []

    def flaky(m: Any, slots: np.ndarray) -> None:
        real(m, slots)
        calls.append(len(slots))
        if len(calls) == 1:
            raise RuntimeError("injected: the turns were let go, then this raised")

    sent: queue.Queue[pb.ObserveBatchRequest | None] = queue.Queue()
    with RuntimeDouble(mv) as rt:
        rt.gate.clear()
        rt.started.clear()
        replies = stub.StreamBatch(iter(sent.get, None), timeout=30)
        sent.put(pb.ObserveBatchRequest(steps=[_one_row(a, 1, 0), _one_row(b, 1, 1)]))
        assert rt.started.wait(10)
        observe = stub.Observe.future(_one_row(a, 2, 7), timeout=30)  # waits for a's turn
        wait_for(lambda: bool(table.waiting))
        sent.put(pb.ObserveBatchRequest(steps=[_one_row(a, 2, 0), _one_row(b, 2, 1)]))  # waits for the first
        monkeypatch.setattr(table, "release_block", flaky)
        rt.gate.set()
        first, second = next(replies), next(replies)
        alone = observe.result()
    sent.put(None)
    assert list(replies) == []
    assert [r.WhichOneof("result") for r in first.results] == ["forecast", "forecast"]
    second_a = second.results[0].WhichOneof("result")
    assert alone.HasField("forecast") != (second_a == "forecast"), "a's step 2 applied twice"
    assert last_sequences(srv, [a, b]) == [2, 2]
