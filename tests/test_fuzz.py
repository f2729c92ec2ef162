"""Issue 7, done when: property-based fuzzing (hypothesis) of every Forecaster method against the real
server on loopback, with malformed and hostile input.

Input kinds: raw bytes (random, and valid requests truncated, spliced, bit-flipped or extended), empty
messages, wrong shapes, NaN and infinity, dimensions that lie about the values' length (up to 2**32-1
rows), zero, negative-as-unsigned and huge sequence numbers, unknown, malformed and 10 kB session ids and
model names, wrong versions, too many series, client deadlines that pass mid-request.

After every example: the answer was OK or a clear status (never UNKNOWN or INTERNAL) with a short,
non-empty message; the server's health is SERVING; no error was logged and no request was counted
INTERNAL or UNKNOWN; and a canary session opened before the fuzzing gives, for its next step, exactly (bit
for bit) the forecast an in-process onnxruntime run of the same model gives for the same rows. A "victim"
session takes the hostile steps: an oracle of what it must accept (the next sequence number with a valid
matrix, a retry with the same rows) is checked on Observe and on Stream, and its applied steps are checked
against the in-process reference too.

Bounded: a fixed number of examples per test (FUZZ_EXAMPLES scales them), no example database, no
per-example deadline; the file runs in well under a minute on two loaded cores.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatecast.service.runtime import ModelRuntime
from gatecast.service.settings import Settings
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, RunningServer, array, matrix, server_settings, taylor_values

METHOD = "/gatecast.v1.Forecaster/"
UNARY = ["Forecast", "OpenSession", "Observe", "CloseSession", "ListModels", "GetModel"]
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
CLEAR_NUMBERS = {c.value[0] for c in CLEAR}
MAX_DETAILS = 1200  # bytes of an error message
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
U32 = 2**32 - 1
U64 = 2**64 - 1


def fuzz(n: int) -> Any:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- the reference: the same graph run in-process, a piece at a time as the batcher runs it -------------


class Reference:
    """One session's state carried in-process through a ModelRuntime loaded like the server's."""

    def __init__(self, rt: ModelRuntime, chunk_rows: int) -> None:
        self.rt = rt
        self.chunk = chunk_rows
        self.states = rt.zero_states(1)

    def step(self, x: np.ndarray) -> np.ndarray:
        y = None
        for i in range(0, x.shape[0], self.chunk):
            y, self.states, _ = self.rt.run(x[None, i : i + self.chunk].astype(np.float32), self.states)
        assert y is not None
        return y[0]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.astype(np.float32).tobytes() == b.astype(np.float32).tobytes()


@dataclass
class Tracked:
    """A session whose every applied step the test knows: its sequence, last rows and last answer."""

    id: str
    ref: Reference
    last_seq: int = 0
    last_rows: np.ndarray | None = None
    last_forecast: np.ndarray | None = None


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Harness:
    srv: RunningServer
    settings: Settings
    channel: grpc.Channel
    stub: pb_grpc.ForecasterStub
    health: health_pb2_grpc.HealthStub
    canary: Tracked
    victim: Tracked
    raw_target: str  # a live session only raw bytes are aimed at (its state is nobody's concern)
    errors: _Errors
    canary_rows: np.ndarray
    examples: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def raw(self, method: str) -> Any:
        return self.channel.unary_unary(METHOD + method, request_serializer=_same, response_deserializer=_same)

    def seen(self, what: str, code: grpc.StatusCode) -> None:
        key = f"{what} {code.name}"
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def check_error(self, what: str, code: grpc.StatusCode, details: str | None) -> None:
        assert code in CLEAR, f"{what}: {code} {str(details)[:300]!r}"
        assert details, f"{what}: {code} without a message"
        assert len(details.encode()) < MAX_DETAILS, f"{what}: a {len(details.encode())}-byte message"

    def call(self, what: str, fn: Any, request: Any, timeout: float = 10.0) -> tuple[grpc.StatusCode, Any]:
        """Calls and checks the status; returns (code, reply or the error's details)."""
        try:
            reply = fn(request, timeout=timeout)
        except grpc.RpcError as e:
            self.check_error(what, e.code(), e.details())
            self.seen(what, e.code())
            return e.code(), e.details()
        self.seen(what, grpc.StatusCode.OK)
        return grpc.StatusCode.OK, reply

    def close(self, session_id: str) -> None:
        code, reply = self.call("CloseSession", self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
        assert code == grpc.StatusCode.OK, reply

    def healthy(self) -> None:
        """The after-every-example property: health, no error logged or counted, the canary exact."""
        self.examples += 1
        for service in ("", "gatecast.v1.Forecaster"):
            status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        assert not self.errors.records, [r.getMessage()[:300] for r in self.errors.records[:3]]
        bad = [
            s.labels
            for metric in self.srv.app.metrics.requests.collect()
            for s in metric.samples
            # counts only: a counter's `_created` sample is its creation time, not events
            if s.name.endswith("_total") and s.labels.get("code") in ("INTERNAL", "UNKNOWN") and s.value > 0
        ]
        assert not bad, bad
        c = self.canary
        k = c.last_seq
        rows = self.canary_rows[k % len(self.canary_rows)][None]
        reply = self.stub.Observe(pb.ObserveRequest(session_id=c.id, sequence=k + 1, rows=matrix(rows)), timeout=10)
        want = c.ref.step(rows)
        got = array(reply.forecast)
        assert same_bits(got, want), f"canary step {k + 1} differs: max |diff| {np.abs(got - want).max()}"
        c.last_seq = k + 1


def _same(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    repo = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    s = server_settings(repo, max_stream_inflight=4, session_idle_s=3600.0)
    srv = RunningServer(s)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    chunk = max(1, min(s.chunk_rows, s.max_batch_rows))
    rt = ModelRuntime.load(repo / "taylor" / "1", s)  # the reference: a runtime of its own, not the server's
    values = taylor_values()
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.ForecasterStub(channel)
    try:
        history = values[:432]
        opened = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(history)), timeout=30)
        canary = Tracked(opened.session_id, Reference(rt, chunk))
        assert same_bits(array(opened.forecast), canary.ref.step(history))
        victim = Tracked(
            stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=30).session_id, Reference(rt, chunk)
        )
        raw_target = stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=30).session_id
        h = Harness(
            srv,
            s,
            channel,
            stub,
            health_pb2_grpc.HealthStub(channel),
            canary,
            victim,
            raw_target,
            errors,
            values[432:],
        )
        yield h
        print(f"\nfuzz: {h.examples} examples, canary stepped {canary.last_seq} times; statuses: {h.statuses}")
    finally:
        logging.getLogger().removeHandler(errors)
        channel.close()
        srv.stop()


# --- strategies -------------------------------------------------------------------------------------------

LONG = st.sampled_from(["m", "é", "\x00", "💥", "taylor"]).map(lambda c: c * (10_000 // len(c)))
NAMES = st.one_of(
    st.just("taylor"),
    st.sampled_from(["", "TAYLOR", "taylor ", " taylor", "taylor\x00", "../taylor", "taylor/1", "*", "tiny_lstm"]),
    st.text(max_size=80),
    LONG,
)
VERSIONS = st.one_of(st.sampled_from([0, 1, 2, U32]), st.integers(0, U32))
MODEL = st.one_of(st.just("taylor"), st.just("taylor"), NAMES)  # mostly the served model, to get past it
VERSION = st.one_of(st.sampled_from([0, 0, 1]), VERSIONS)
# values as float32: ordinary loads, then the hostile ones
ORDINARY = st.floats(min_value=0.0, max_value=60_000.0, width=32)
HOSTILE_FLOAT = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e-45, -0.0, 0.0]),
    st.floats(width=32),
)


@st.composite
def values_for(draw: st.DrawFn, n: int, hostile: bool = True) -> list[float]:
    """n float32 values: a random load curve, maybe with a few drawn values (NaN, inf, huge, tiny) in it."""
    seed = draw(st.integers(0, 2**31))
    x = np.random.default_rng(seed).uniform(20_000, 40_000, n).astype(np.float32)
    if n and hostile and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            x[draw(st.integers(0, n - 1))] = draw(HOSTILE_FLOAT)
    return [float(v) for v in x]


@st.composite
def matrices(draw: st.DrawFn) -> pb.Matrix:
    """Mostly the model's shape (1 column); wrong widths, zero or huge row counts, and values that
    lie about their count."""
    rows = draw(
        st.one_of(
            st.integers(1, 8),
            st.sampled_from([0, 1, 2, 431, 432, 512, 513, 600, 100_000, 100_001, 1_000_001, 2**31, U32]),
            st.integers(0, U32),
        )
    )
    cols = draw(st.one_of(st.just(1), st.just(1), st.integers(0, 3), st.sampled_from([2**31, U32])))
    honest = rows * cols <= 700 and draw(st.integers(0, 3)) > 0
    if honest:
        values = draw(values_for(rows * cols))
    else:
        values = draw(st.lists(st.one_of(ORDINARY, HOSTILE_FLOAT), max_size=12))
    return pb.Matrix(rows=rows, cols=cols, values=values)


# what a client means to send: a few ordinary rows, or more than a chunk
ROWS = st.tuples(st.one_of(st.integers(1, 4), st.sampled_from([513, 600])), st.integers(0, 2)).flatmap(
    lambda t: st.builds(lambda v: pb.Matrix(rows=t[0], cols=1, values=v), values_for(t[0], hostile=t[1] == 0))
)


def matrix_ok(m: pb.Matrix, s: Settings) -> bool:
    """What the server must accept as a matrix of the taylor model (1 feature)."""
    if not (1 <= m.rows <= s.max_rows and m.cols == 1 and len(m.values) == m.rows * m.cols):
        return False
    return bool(np.isfinite(np.asarray(m.values, np.float32)).all())


def valid_model(name: str, version: int) -> bool:
    return name == "taylor" and version in (0, 1)


# --- raw bytes on every method ------------------------------------------------------------------------------


def templates(h: Harness) -> dict[str, bytes]:
    """A valid request per method, for mutations that reach past the first bytes. Observe and Stream aim at
    the raw-target session; CloseSession at a session that does not exist (never the canary or victim)."""
    rows = matrix(taylor_values()[:3])
    return {
        "Forecast": pb.ForecastRequest(model="taylor", series=[rows, rows]).SerializeToString(),
        "OpenSession": pb.OpenSessionRequest(model="taylor", history=rows).SerializeToString(),
        "Observe": pb.ObserveRequest(session_id=h.raw_target, sequence=1, rows=rows).SerializeToString(),
        "CloseSession": pb.CloseSessionRequest(session_id="0" * 32).SerializeToString(),
        "ListModels": b"",
        "GetModel": pb.GetModelRequest(name="taylor", version=1).SerializeToString(),
    }


@st.composite
def hostile_bytes(draw: st.DrawFn, template: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice", "append", "repeat"]))
    if kind == "random" or not template:
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return template[: draw(st.integers(0, len(template) - 1))]
    if kind == "flip":
        data = bytearray(template)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "splice":
        i = draw(st.integers(0, len(template)))
        return template[:i] + draw(st.binary(min_size=1, max_size=40)) + template[i:]
    if kind == "append":
        return template + draw(st.binary(min_size=1, max_size=60))
    return template * draw(st.integers(2, 5))  # repeated fields merge, strings are overwritten


def _close_if_opened(h: Harness, method: str, code: grpc.StatusCode, reply: Any) -> None:
    if method == "OpenSession" and code == grpc.StatusCode.OK:
        h.close(pb.OpenSessionResponse.FromString(reply).session_id)


@fuzz(160)
@given(data=st.data(), method=st.sampled_from(UNARY))
@example(data=None, method="Forecast")  # None: the empty message, on each method
@example(data=None, method="OpenSession")
@example(data=None, method="Observe")
@example(data=None, method="CloseSession")
@example(data=None, method="ListModels")
@example(data=None, method="GetModel")
def test_raw_bytes_on_every_unary_method(harness: Harness, data: Any, method: str) -> None:
    h = harness
    payload = b"" if data is None else data.draw(hostile_bytes(templates(h)[method]), label="bytes")
    code, reply = h.call(method, h.raw(method), payload)
    if data is None and method != "ListModels":  # an empty request names nothing: it cannot succeed
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (method, code, reply)
    if code == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid" in reply:
        assert f"gatecast.v1.{method}Request" in reply, reply
    _close_if_opened(h, method, code, reply)
    h.healthy()


@fuzz(50)
@given(data=st.data(), n=st.integers(1, 6))
def test_raw_bytes_on_stream_are_answered_one_by_one(harness: Harness, data: Any, n: int) -> None:
    h = harness
    template = templates(h)["Observe"]
    msgs = [data.draw(hostile_bytes(template), label=f"message {i}") for i in range(n)]
    stream = h.channel.stream_stream(
        METHOD + "Stream", request_serializer=_same, response_deserializer=pb.StreamResponse.FromString
    )
    try:
        replies = list(stream(iter(msgs), timeout=10))
    except grpc.RpcError as e:
        raise AssertionError(f"the stream ended with {e.code()} {e.details()!r}") from e
    assert len(replies) == n, f"{len(replies)} answers to {n} messages"
    for r in replies:
        if r.WhichOneof("result") == "error":
            assert r.error.code in CLEAR_NUMBERS, r.error
            assert r.error.message and len(r.error.message.encode()) < MAX_DETAILS
    h.healthy()


# --- structured hostile requests -----------------------------------------------------------------------------


SERIES = st.one_of(
    st.lists(ROWS, min_size=1, max_size=4),
    st.lists(st.one_of(ROWS, matrices()), max_size=4),
    st.tuples(matrices(), st.sampled_from([4097, 5000])).map(  # too many series
        lambda t: [pb.Matrix(rows=t[0].rows, cols=t[0].cols, values=t[0].values[:3])] * t[1]
    ),
)
TIMEOUTS = st.one_of(st.just(10.0), st.just(10.0), st.just(10.0), st.sampled_from([0.0005, 0.002, 0.02]))


@fuzz(120)
@given(name=MODEL, version=VERSION, series=SERIES, timeout=TIMEOUTS)
def test_forecast(harness: Harness, name: str, version: int, series: list[pb.Matrix], timeout: float) -> None:
    h, s = harness, harness.settings
    request = pb.ForecastRequest(model=name, version=version, series=series)
    code, reply = h.call("Forecast", h.stub.Forecast, request, timeout)
    valid = (
        valid_model(name, version)
        and 1 <= len(series) <= s.max_series
        and sum(m.rows for m in series) <= s.max_request_rows
        and all(matrix_ok(m, s) for m in series)
    )
    if code == grpc.StatusCode.OK:
        assert valid, "an invalid request was answered OK"
        assert [(f.rows, f.cols) for f in reply.forecasts] == [(48, 1)] * len(series)
    elif code != grpc.StatusCode.DEADLINE_EXCEEDED:
        assert not valid, f"a valid request was refused: {code} {reply!r}"
    h.healthy()


OPTIONAL_MATRIX = st.one_of(st.none(), ROWS, matrices())
EMPTY = [pb.Matrix(), pb.Matrix(rows=0, cols=1)]  # an empty history is no history


@fuzz(80)
@given(name=MODEL, version=VERSION, history=OPTIONAL_MATRIX, timeout=TIMEOUTS)
@example(name="taylor", version=0, history=pb.Matrix(), timeout=10.0)
@example(name="taylor", version=0, history=pb.Matrix(rows=0, cols=1, values=[30000.0, 31000.0]), timeout=10.0)
@example(name="taylor", version=0, history=pb.Matrix(rows=0, cols=2**31), timeout=10.0)  # found in CI: a lying size
def test_open_session(harness: Harness, name: str, version: int, history: pb.Matrix | None, timeout: float) -> None:
    h, s = harness, harness.settings
    request = pb.OpenSessionRequest(model=name, version=version)
    if history is not None:
        request.history.CopyFrom(history)
    code, reply = h.call("OpenSession", h.stub.OpenSession, request, timeout)
    absent = history is None or history in EMPTY
    valid = valid_model(name, version) and (history is None or absent or matrix_ok(history, s))
    if code == grpc.StatusCode.OK:
        assert valid, "an invalid OpenSession was answered OK"
        assert reply.model == "taylor" and reply.next_sequence == 1
        assert reply.HasField("forecast") == (not absent)
        h.close(reply.session_id)
    elif code != grpc.StatusCode.DEADLINE_EXCEEDED:
        assert not valid, f"a valid OpenSession was refused: {code} {reply!r}"
    h.healthy()


# session ids and sequence numbers: the victim's (relative to its last step), and hostile ones
IDS = st.one_of(
    st.just("victim"),
    st.just("victim"),
    st.just("victim"),
    st.just("victim"),
    st.sampled_from(["", "victim-upper", "victim+0", "victim-short", "0" * 32, "g" * 32]),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    st.text(max_size=64),
    LONG,
)
SEQUENCES = st.one_of(
    st.just("next"),
    st.just("next"),
    st.sampled_from(["next", "last", "last", "last+2", "last-1"]),
    st.sampled_from([0, 1, 2**63, U64]),
    st.integers(0, U64),
)


def resolve_id(h: Harness, choice: str) -> str:
    v = h.victim.id
    return {"victim": v, "victim-upper": v.upper(), "victim+0": v + "0", "victim-short": v[:-1]}.get(choice, choice)


def resolve_seq(last: int, choice: int | str) -> int:
    if isinstance(choice, int):
        return choice
    return {"next": last + 1, "last": last, "last+2": last + 2, "last-1": max(0, last - 1)}[choice]


def victim_oracle(h: Harness, req: pb.ObserveRequest, code: int, forecast: pb.Matrix | None, what: str) -> None:
    """What the victim session must have answered to `req`, given every step it applied before; updates it."""
    t, s = h.victim, h.settings
    ok = code == grpc.StatusCode.OK.value[0]
    if req.session_id != t.id:
        assert not ok, f"{what}: a step for session {req.session_id[:40]!r} was answered OK"
        return
    rows_ok = matrix_ok(req.rows, s)
    x = np.asarray(req.rows.values, np.float32).reshape(req.rows.rows, 1) if rows_ok else None
    if req.sequence == 0 or not rows_ok:
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], f"{what}: {code} for a malformed step"
    elif req.sequence == t.last_seq + 1:
        assert ok, f"{what}: the next step ({req.sequence}) was refused with {code}"
        assert forecast is not None and x is not None
        want = t.ref.step(x)
        assert same_bits(array(forecast), want), f"{what}: victim step {req.sequence} differs from the reference"
        t.last_seq, t.last_rows, t.last_forecast = req.sequence, x, want
    elif req.sequence == t.last_seq and t.last_seq > 0:
        assert t.last_rows is not None and t.last_forecast is not None and x is not None
        if same_bits(x, t.last_rows):
            assert ok, f"{what}: a retry of step {req.sequence} with the same rows was refused with {code}"
            assert forecast is not None and same_bits(array(forecast), t.last_forecast), f"{what}: retry differs"
        else:
            assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0], f"{what}: retry with other rows: {code}"
    else:
        assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0], f"{what}: sequence {req.sequence}: {code}"


@st.composite
def observe_requests(draw: st.DrawFn, h: Harness, last_seq: int, last_rows: np.ndarray | None) -> pb.ObserveRequest:
    """A step for the victim (numbered relative to `last_seq`, its last applied step as the earlier
    messages leave it) or for a session that does not exist."""
    sid = resolve_id(h, draw(IDS, label="session"))
    choice = draw(SEQUENCES, label="sequence")
    if choice == "last" and last_rows is not None and draw(st.booleans()):
        rows = matrix(last_rows)  # a true retry
    else:
        rows = draw(st.one_of(ROWS, ROWS, matrices()), label="rows")
    return pb.ObserveRequest(session_id=sid, sequence=resolve_seq(last_seq, choice), rows=rows)


def applies(h: Harness, req: pb.ObserveRequest, last_seq: int) -> bool:
    return req.session_id == h.victim.id and req.sequence == last_seq + 1 and matrix_ok(req.rows, h.settings)


@fuzz(120)
@given(data=st.data())
def test_observe(harness: Harness, data: Any) -> None:
    h = harness
    req = data.draw(observe_requests(h, h.victim.last_seq, h.victim.last_rows), label="request")
    code, reply = h.call("Observe", h.stub.Observe, req)
    forecast = reply.forecast if code == grpc.StatusCode.OK else None
    if code == grpc.StatusCode.OK:
        assert reply.session_id == req.session_id and reply.sequence == req.sequence
    victim_oracle(h, req, code.value[0], forecast, "Observe")
    h.healthy()


@fuzz(60)
@given(data=st.data(), n=st.integers(1, 8))
def test_stream(harness: Harness, data: Any, n: int) -> None:
    """Steps for the victim in order (the oracle is applied in message order: a session's answers come in
    its message order), mixed with undecodable messages and steps for sessions that do not exist."""
    h = harness
    template = templates(h)["Observe"]
    msgs: list[pb.ObserveRequest | bytes] = []
    last, last_rows = h.victim.last_seq, h.victim.last_rows  # as the earlier messages will leave the victim
    for i in range(n):
        if data.draw(st.integers(0, 3), label=f"kind {i}") == 0:
            msgs.append(data.draw(hostile_bytes(template), label=f"bytes {i}"))
            continue
        req = data.draw(observe_requests(h, last, last_rows), label=f"request {i}")
        if applies(h, req, last):
            last, last_rows = req.sequence, array(req.rows)
        msgs.append(req)
    stream = h.channel.stream_stream(
        METHOD + "Stream", request_serializer=_same, response_deserializer=pb.StreamResponse.FromString
    )
    wire = [m if isinstance(m, bytes) else m.SerializeToString() for m in msgs]
    try:
        replies = list(stream(iter(wire), timeout=10))
    except grpc.RpcError as e:
        raise AssertionError(f"the stream ended with {e.code()} {e.details()!r}") from e
    assert len(replies) == n, f"{len(replies)} answers to {n} messages"
    for r in replies:
        h.seen("Stream", grpc.StatusCode.OK if r.WhichOneof("result") == "forecast" else _code(r.error.code))
        if r.WhichOneof("result") == "error":
            assert r.error.code in CLEAR_NUMBERS, r.error
            assert r.error.message and len(r.error.message.encode()) < MAX_DETAILS
    victim_msgs = [m for m in msgs if isinstance(m, pb.ObserveRequest) and m.session_id == h.victim.id]
    victim_replies = [r for r in replies if r.session_id == h.victim.id]
    assert len(victim_replies) == len(victim_msgs)
    for i, (m, r) in enumerate(zip(victim_msgs, victim_replies, strict=True)):
        assert r.sequence == m.sequence, "the victim's answers came out of its message order"
        ok = r.WhichOneof("result") == "forecast"
        victim_oracle(h, m, 0 if ok else r.error.code, r.forecast if ok else None, f"Stream message {i}")
    h.healthy()


def _code(number: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == number)


CLOSE_IDS = st.one_of(
    st.sampled_from(["", "0" * 32, "F" * 32, "opened", "opened-twice", "victim-upper"]),
    st.text(alphabet="0123456789abcdef", min_size=31, max_size=33),
    st.text(max_size=64),
    LONG,
)


@fuzz(60)
@given(choice=CLOSE_IDS)
def test_close_session(harness: Harness, choice: str) -> None:
    h = harness
    if choice in ("opened", "opened-twice"):
        sid = h.stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=10).session_id
        code, reply = h.call("CloseSession", h.stub.CloseSession, pb.CloseSessionRequest(session_id=sid))
        assert code == grpc.StatusCode.OK and reply.session_id == sid and reply.steps == 0
        if choice == "opened-twice":
            code, reply = h.call("CloseSession", h.stub.CloseSession, pb.CloseSessionRequest(session_id=sid))
            assert code == grpc.StatusCode.NOT_FOUND, (code, reply)
    else:
        sid = resolve_id(h, choice)
        assert sid not in (h.victim.id, h.canary.id)
        code, reply = h.call("CloseSession", h.stub.CloseSession, pb.CloseSessionRequest(session_id=sid))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, reply)
    h.healthy()


@fuzz(50)
@given(name=NAMES, version=VERSIONS, listing=st.booleans())
def test_get_and_list_models(harness: Harness, name: str, version: int, listing: bool) -> None:
    h = harness
    if listing:
        code, reply = h.call("ListModels", h.stub.ListModels, pb.ListModelsRequest())
        assert code == grpc.StatusCode.OK and [(m.name, m.version) for m in reply.models] == [("taylor", 1)]
    code, reply = h.call("GetModel", h.stub.GetModel, pb.GetModelRequest(name=name, version=version))
    if valid_model(name, version):
        assert code == grpc.StatusCode.OK and (reply.name, reply.version) == ("taylor", 1), (code, reply)
    else:
        assert code == grpc.StatusCode.NOT_FOUND, (code, reply)
    h.healthy()


def test_the_fuzzing_reached_every_method_and_answer(harness: Harness) -> None:
    """Runs last in this file: the examples above exercised what this suite is for."""
    if harness.examples < 100:
        pytest.skip("checks what the fuzz tests above did: run with them")
    seen = set(harness.statuses)
    for method in [*UNARY, "Stream"]:
        assert any(k.startswith(method + " ") for k in seen), f"{method} was never called"
    for want in (
        "Forecast OK",
        "Forecast INVALID_ARGUMENT",
        "Forecast NOT_FOUND",
        "Observe OK",
        "Observe FAILED_PRECONDITION",
        "Observe INVALID_ARGUMENT",
        "Stream OK",
        "OpenSession OK",
    ):
        assert want in seen, f"no example gave {want}: {sorted(seen)}"
    assert harness.victim.last_seq > 0 and harness.canary.last_seq >= harness.examples


# --- regressions of what the fuzzing found ------------------------------------------------------------------


def test_a_step_whose_client_left_logs_no_error(tmp_path: Path) -> None:
    """Found by the fuzzing: an OpenSession (with history) or Observe whose client deadline passed while
    its step was queued left the step's error unread (asyncio.shield drops its callback when the caller
    goes), and asyncio logged "Future exception was never retrieved" at ERROR for an ordinary timeout."""
    from tests.test_reliability_engine import RuntimeDouble, serve, version

    shutil.copytree(DEFAULT_MODEL, tmp_path / "taylor")
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    row = matrix(np.array([[30000.0]]))
    try:
        with serve(tmp_path) as srv, grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=10).session_id
            mv = version(srv)
            with RuntimeDouble(mv) as rt:
                rt.gate.clear()  # the worker is held: what comes next waits in the queue past its deadline
                held = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[row]), timeout=20)
                assert rt.started.wait(10)
                history = matrix(taylor_values()[:432])
                for call, request in (
                    (stub.OpenSession, pb.OpenSessionRequest(model="taylor", history=history)),
                    (stub.Observe, pb.ObserveRequest(session_id=sid, sequence=1, rows=row)),
                ):
                    with pytest.raises(grpc.RpcError) as e:
                        call(request, timeout=0.3)
                    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                time.sleep(0.2)
                rt.gate.set()
                assert len(held.result(timeout=10).forecasts) == 1
            end = time.monotonic() + 10
            while mv.batcher.queued_rows or srv.app.sessions.get(sid).busy:
                assert time.monotonic() < end, "the queued steps were never dropped"
                time.sleep(0.01)
            gc.collect()
            time.sleep(0.1)
            assert not errors.records, [r.getMessage()[:200] for r in errors.records]
            # the dropped step was not applied: the session still expects sequence 1
            reply = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=row), timeout=10)
            assert reply.sequence == 1 and reply.forecast.rows == 48
    finally:
        logging.getLogger().removeHandler(errors)


def test_a_history_with_values_but_no_rows_is_refused(harness: Harness) -> None:
    """Found by the fuzzing: OpenSession took a history of rows 0 beside values as no history at all (OK,
    the client's rows silently dropped). An empty matrix still means no history."""
    lying = pb.Matrix(rows=0, cols=1, values=[30000.0, 31000.0])
    with pytest.raises(grpc.RpcError) as e:
        harness.stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=lying), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "history: no rows but 2 values" in e.value.details(), e.value.details()
    for empty in EMPTY:
        opened = harness.stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=empty), timeout=10)
        assert opened.history_rows == 0 and not opened.HasField("forecast")
        harness.close(opened.session_id)
