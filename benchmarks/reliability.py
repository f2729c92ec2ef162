"""Reliability report (issue 7): the real server in subprocesses (`gatecast serve`), a real gRPC client here.

1. Hostile corpus: a fixed, seeded set of malformed and hostile requests on every Forecaster method (raw
   bytes, mutated valid messages, empty messages, NaN/inf, wrong shapes, dimensions that lie, huge and
   zero sequence numbers, garbage and 10 kB ids and names, wrong versions, too many series) and streams
   mixing them with valid steps. Every answer's status is tallied; a status outside {OK, INVALID_ARGUMENT,
   NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, OUT_OF_RANGE, DEADLINE_EXCEEDED}, or an empty or
   over-long message, is "unclear". Health is checked after every case; a canary session is stepped every
   few cases and compared bit for bit with a twin session on a reference server that sees no hostile input.
   The server is then stopped with SIGTERM (its exit code is reported).
2. SIGTERM: N sessions stepped on a server with a snapshot path and on the reference; SIGTERM arrives while
   a round of steps is queued; the server is restarted on its snapshot and every client continues at the
   sequence number it is told, comparing each answer with the reference that never restarted.
3. kill -9: the same with periodic snapshots: once a snapshot holds every session, more steps, then
   SIGKILL. After the restart each session must resume right after its last snapshotted step (the file
   read after the kill says which); the client resends what was lost and the answers must equal the
   reference's.
4. Latency: p50/p99 of small Forecast requests (one 432-row window) idle, and while a maximal legal
   request (10 series x 100,000 rows = GATECAST_MAX_REQUEST_ROWS) runs; the ratio busy/idle.

Crashes: server processes that died when they should have been running.

    python -m benchmarks.reliability --out benchmarks/results/reliability.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.load import start_server
from gatecast.service.snapshot import read_file
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "taylor_halfhourly.csv"
MODEL = ROOT / "models" / "taylor"
METHOD = "/gatecast.v1.Forecaster/"
CLEAR = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE"}
CLEAR |= {"DEADLINE_EXCEEDED"}
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
MAX_DETAILS = 1200
U32 = 2**32 - 1
U64 = 2**64 - 1
CONTEXT = 432


def _same(b: bytes) -> bytes:
    return b


def _m(rows: int, cols: int, values: Any) -> pb.Matrix:
    return pb.Matrix(rows=rows, cols=cols, values=[float(v) for v in values])


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def _array(m: pb.Matrix) -> np.ndarray:
    return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q) * 1000.0) if xs else float("nan")


# --- servers ---------------------------------------------------------------------------------------------


STARTED: list[subprocess.Popen[str]] = []  # every server process this run started, killed at the end


@dataclass
class Server:
    """`gatecast serve` in a subprocess, with a channel and stubs to it."""

    name: str
    repo: Path
    env: dict[str, str]
    proc: subprocess.Popen[str] = field(init=False)
    port: int = field(init=False)
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.ForecasterStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.proc, self.port = start_server(self.repo, self.env)
        STARTED.append(self.proc)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.ForecasterStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def raw(self, method: str) -> Any:
        return self.channel.unary_unary(METHOD + method, request_serializer=_same, response_deserializer=_same)

    def serving(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> int:
        """Sends `sig` and waits for the exit; returns the exit code."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.channel.close()
        return code

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)


# --- 1. the hostile corpus -------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    unclear: list[str] = field(default_factory=list)
    cases: int = 0

    def add(self, method: str, kind: str, code: str, details: str) -> None:
        self.statuses.setdefault(method, Counter())[code] += 1
        if code != "OK":
            size = len(details.encode())
            if code not in CLEAR or not details or size >= MAX_DETAILS:
                self.unclear.append(f"{method} {kind}: {code} ({size} bytes) {details[:120]!r}")


def _mutations(rng: np.random.Generator, template: bytes, n: int) -> Iterator[tuple[str, bytes]]:
    for i in range(n):
        kind = ["truncated", "bit-flipped", "spliced", "appended", "repeated"][i % 5]
        if not template:  # the empty message (ListModels): unknown fields only
            yield "random bytes", rng.bytes(int(rng.integers(1, 60)))
        elif kind == "truncated":
            yield kind, template[: int(rng.integers(0, max(1, len(template))))]
        elif kind == "bit-flipped":
            data = bytearray(template)
            for _ in range(int(rng.integers(1, 5))):
                j = int(rng.integers(0, len(data)))
                data[j] ^= 1 << int(rng.integers(0, 8))
            yield kind, bytes(data)
        elif kind == "spliced":
            j = int(rng.integers(0, len(template) + 1))
            yield kind, template[:j] + rng.bytes(int(rng.integers(1, 40))) + template[j:]
        elif kind == "appended":
            yield kind, template + rng.bytes(int(rng.integers(1, 60)))
        else:
            yield kind, template * int(rng.integers(2, 5))


def hostile_matrices() -> list[tuple[str, pb.Matrix]]:
    nan, inf = float("nan"), float("inf")
    return [
        ("NaN", _m(3, 1, [30000, nan, 31000])),
        ("+inf", _m(3, 1, [inf, 1, 2])),
        ("-inf", _m(2, 1, [1, -inf])),
        ("3 columns for 1 feature", _m(3, 3, range(9))),
        ("zero rows", _m(0, 1, [])),
        ("zero rows beside values", _m(0, 1, [1, 2])),
        ("zero columns", _m(3, 0, [])),
        ("rows 2**32-1, 3 values", _m(U32, 1, [1, 2, 3])),
        ("cols 2**32-1, 1 value", _m(1, U32, [1])),
        ("fewer values than rows", _m(5, 1, [1, 2])),
        ("more values than rows", _m(2, 1, [1, 2, 3, 4])),
        ("rows over max_rows", _m(100_001, 1, [1])),
        ("huge finite values", _m(3, 1, [3.4e38] * 3)),
        ("subnormal values", _m(3, 1, [1e-45] * 3)),
    ]


def hostile_names(rng: np.random.Generator) -> list[tuple[str, str]]:
    return [
        ("empty name", ""),
        ("upper case", "TAYLOR"),
        ("NUL inside", "taylor\x00"),
        ("path", "../taylor"),
        ("10 kB ASCII", "m" * 10_000),
        ("10 kB two-byte", "é" * 5_000),
        ("10 kB emoji", "\U0001f4a5" * 2_500),
        ("random text", "".join(chr(int(c)) for c in rng.integers(0x20, 0x2FF, 40))),
    ]


def corpus_unary(
    rng: np.random.Generator, target: Callable[[], tuple[str, int]], window: np.ndarray
) -> Iterator[tuple[str, str, bytes]]:
    """(method, kind, bytes). `target` gives the raw-target session's id and next sequence number now."""
    good = _matrix(window[:3])
    full = _matrix(window)
    mats = hostile_matrices()
    names = hostile_names(rng)
    versions = [("version 2", 2), ("version 7", 7), ("version 2**32-1", U32)]
    ids = [
        ("empty id", ""),
        ("32 zeros", "0" * 32),
        ("32 non-hex", "g" * 32),
        ("10 kB id", "x" * 10_000),
        ("random hex, no such session", rng.bytes(16).hex()),
    ]
    templates = {
        "Forecast": pb.ForecastRequest(model="taylor", series=[good, good]),
        "OpenSession": pb.OpenSessionRequest(model="taylor", history=good),
        "Observe": pb.ObserveRequest(session_id=target()[0], sequence=1, rows=good),
        "CloseSession": pb.CloseSessionRequest(session_id="0" * 32),
        "ListModels": pb.ListModelsRequest(),
        "GetModel": pb.GetModelRequest(name="taylor", version=1),
    }
    for method, template in templates.items():
        yield method, "empty message", b""
        for _ in range(40):
            yield method, "random bytes", rng.bytes(int(rng.integers(1, 300)))
        yield from ((method, k, b) for k, b in _mutations(rng, template.SerializeToString(), 60))
    # Forecast
    yield "Forecast", "valid control", pb.ForecastRequest(model="taylor", series=[full]).SerializeToString()
    for kind, m in mats:
        yield "Forecast", kind, pb.ForecastRequest(model="taylor", series=[good, m]).SerializeToString()
    for kind, name in names:
        yield "Forecast", kind, pb.ForecastRequest(model=name, series=[good]).SerializeToString()
    for kind, v in versions:
        yield "Forecast", kind, pb.ForecastRequest(model="taylor", version=v, series=[good]).SerializeToString()
    yield "Forecast", "no series", pb.ForecastRequest(model="taylor").SerializeToString()
    yield "Forecast", "5000 series", pb.ForecastRequest(model="taylor", series=[good] * 5000).SerializeToString()
    lie = _m(100_000, 1, [1.0])
    yield (
        "Forecast",
        "11 x 100,000 rows claimed",
        pb.ForecastRequest(model="taylor", series=[lie] * 11).SerializeToString(),
    )
    # OpenSession (an OK one is closed by the runner)
    yield "OpenSession", "valid control", pb.OpenSessionRequest(model="taylor", history=full).SerializeToString()
    for kind, m in mats:
        yield "OpenSession", f"history: {kind}", pb.OpenSessionRequest(model="taylor", history=m).SerializeToString()
    for kind, name in names:
        yield "OpenSession", kind, pb.OpenSessionRequest(model=name).SerializeToString()
    for kind, v in versions:
        yield "OpenSession", kind, pb.OpenSessionRequest(model="taylor", version=v).SerializeToString()
    # Observe, on a live session (numbered now, as the earlier cases left it) and on ids that are not one
    for kind, m in mats:
        sid, nxt = target()
        yield "Observe", f"rows: {kind}", pb.ObserveRequest(session_id=sid, sequence=nxt, rows=m).SerializeToString()
        sid, nxt = target()
        yield "Observe", "valid step", pb.ObserveRequest(session_id=sid, sequence=nxt, rows=good).SerializeToString()
    for kind, seq in [("sequence 0", 0), ("sequence 2**63", 2**63), ("sequence 2**64-1", U64), ("a gap", -1)]:
        sid, nxt = target()
        seq = nxt + 1 if seq == -1 else seq
        yield "Observe", kind, pb.ObserveRequest(session_id=sid, sequence=seq, rows=good).SerializeToString()
    for kind, sid in ids:
        yield "Observe", kind, pb.ObserveRequest(session_id=sid, sequence=1, rows=good).SerializeToString()
    sid, _ = target()
    for kind, other in (("id upper case", sid.upper()), ("id one char longer", sid + "0"), ("id cut", sid[:-1])):
        yield "Observe", kind, pb.ObserveRequest(session_id=other, sequence=1, rows=good).SerializeToString()
    # CloseSession, GetModel, ListModels
    for kind, sid in ids:
        yield "CloseSession", kind, pb.CloseSessionRequest(session_id=sid).SerializeToString()
    for kind, name in names:
        yield "GetModel", kind, pb.GetModelRequest(name=name).SerializeToString()
    for kind, v in versions:
        yield "GetModel", kind, pb.GetModelRequest(name="taylor", version=v).SerializeToString()
    for kind, data in (("unknown varint field", b"\x08\x01"), ("unknown string field", b"\x12\x03abc")):
        yield "ListModels", kind, data


def run_corpus(ref: Server, repo: Path, rng: np.random.Generator, values: np.ndarray) -> dict[str, Any]:
    srv = Server("fuzzed", repo, {})
    tally = Tally()
    crashes = 0
    not_serving = 0
    window = values[:CONTEXT]
    # the canary, and its twin on the reference server: same history, same steps
    history = _matrix(values[100 : 100 + CONTEXT])
    canary = srv.stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history), timeout=30)
    twin = ref.stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history), timeout=30)
    canary_checks = canary_mismatches = 0
    if _array(canary.forecast).tobytes() != _array(twin.forecast).tobytes():
        canary_mismatches += 1
    canary_seq = 0
    target_id = srv.stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=30).session_id
    target_next = [1]

    def step_canary() -> None:
        nonlocal canary_seq, canary_checks, canary_mismatches
        if crashes:  # the canary died with the server: counted as a crash, not compared any more
            return
        canary_seq += 1
        rows = _matrix(values[CONTEXT + 100 + canary_seq : CONTEXT + 101 + canary_seq])
        a = srv.stub.Observe(
            pb.ObserveRequest(session_id=canary.session_id, sequence=canary_seq, rows=rows), timeout=30
        )
        b = ref.stub.Observe(pb.ObserveRequest(session_id=twin.session_id, sequence=canary_seq, rows=rows), timeout=30)
        canary_checks += 1
        canary_mismatches += _array(a.forecast).tobytes() != _array(b.forecast).tobytes()

    def after_case() -> None:
        nonlocal crashes, not_serving
        tally.cases += 1
        if not srv.alive():
            crashes += 1
            srv.start()
        elif not srv.serving():
            not_serving += 1
        if tally.cases % 10 == 0:
            step_canary()

    t0 = time.monotonic()
    for method, kind, data in corpus_unary(rng, lambda: (target_id, target_next[0]), window):
        try:
            reply = srv.raw(method)(data, timeout=30)
            tally.add(method, kind, "OK", "")
            if method == "OpenSession":
                srv.stub.CloseSession(
                    pb.CloseSessionRequest(session_id=pb.OpenSessionResponse.FromString(reply).session_id)
                )
            if method == "Observe" and pb.ObserveResponse.FromString(reply).session_id == target_id:
                target_next[0] = pb.ObserveResponse.FromString(reply).sequence + 1
        except grpc.RpcError as e:
            tally.add(method, kind, e.code().name, e.details() or "")
        after_case()
    # streams: hostile messages mixed with valid steps of one session, which must all be answered in order
    stream_id = srv.stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=30).session_id
    stream_next = 1
    pool = [
        (k, b)
        for m, k, b in corpus_unary(rng, lambda: (target_id, 10**9), window)
        if m == "Observe" and k != "valid step"  # numbered 10**9 here: out of order
    ]
    streams = stream_messages = stream_lost = 0
    call = srv.channel.stream_stream(
        METHOD + "Stream", request_serializer=_same, response_deserializer=pb.StreamResponse.FromString
    )
    for _ in range(100):
        msgs: list[tuple[str, bytes]] = []
        valid: list[int] = []
        for _ in range(int(rng.integers(1, 9))):
            if rng.random() < 0.3:
                valid.append(stream_next)
                good = _matrix(values[stream_next % 1000 : stream_next % 1000 + 1])
                step = pb.ObserveRequest(session_id=stream_id, sequence=stream_next, rows=good)
                msgs.append(("valid step", step.SerializeToString()))
                stream_next += 1
            else:
                msgs.append(pool[int(rng.integers(0, len(pool)))])
        streams += 1
        stream_messages += len(msgs)
        try:
            replies = list(call(iter([b for _, b in msgs]), timeout=30))
            tally.add("Stream", "stream", "OK", "")
        except grpc.RpcError as e:
            tally.add("Stream", "stream", e.code().name, e.details() or "")
            replies = []
        stream_lost += len(msgs) - len(replies)
        mine = [r for r in replies if r.session_id == stream_id]
        if [r.sequence for r in mine] != valid or any(r.WhichOneof("result") != "forecast" for r in mine):
            tally.unclear.append(
                f"Stream: the valid steps {valid} were answered {[(r.sequence, r.WhichOneof('result')) for r in mine]}"
            )
        for (kind, _), r in zip(msgs, replies, strict=False):
            if r.WhichOneof("result") == "error":
                tally.add("Stream message", kind, CODE_NAMES.get(r.error.code, str(r.error.code)), r.error.message)
            else:
                tally.add("Stream message", kind, "OK", "")
        after_case()
    step_canary()
    seconds = time.monotonic() - t0
    alive = srv.alive()
    exit_code = srv.signal(signal.SIGTERM) if alive else None
    crashes += 0 if alive else 1
    return {
        "cases": tally.cases,
        "stream_messages": stream_messages,
        "streams": streams,
        "stream_messages_unanswered": stream_lost,
        "statuses": {m: dict(sorted(c.items())) for m, c in tally.statuses.items()},
        "unclear": tally.unclear,
        "not_serving_after_a_case": not_serving,
        "canary_checks": canary_checks,
        "canary_mismatches": canary_mismatches,
        "crashes": crashes,
        "sigterm_exit_code_after_fuzzing": exit_code,
        "seconds": round(seconds, 1),
    }


# --- 2 and 3. sessions across SIGTERM and kill -9 ----------------------------------------------------------


class Fleet:
    """N sessions opened with the same histories on a server and on the reference; steps sent to both."""

    def __init__(self, values: np.ndarray, n: int) -> None:
        self.values = values
        self.n = n
        self.ids: dict[str, list[str]] = {}
        self.answers: dict[tuple[int, int], bytes] = {}  # (session, seq) -> the reference's forecast bytes

    def rows(self, i: int, seq: int) -> pb.Matrix:
        j = (CONTEXT + 13 * i + seq) % len(self.values)
        return _matrix(self.values[j : j + 1])

    def open(self, srv: Server) -> None:
        futures = [
            srv.stub.OpenSession.future(
                pb.OpenSessionRequest(model="taylor", history=_matrix(self.values[7 * i : 7 * i + CONTEXT])), timeout=60
            )
            for i in range(self.n)
        ]
        self.ids[srv.name] = [f.result().session_id for f in futures]

    def step(self, srv: Server, seqs: list[int], timeout: float = 60) -> list[Any]:
        """Session i steps with sequence seqs[i]; returns each reply or RpcError."""
        got = self.step_some(srv, dict(enumerate(seqs)), timeout)
        return [got[i] for i in range(len(seqs))]

    def step_some(self, srv: Server, seqs: dict[int, int], timeout: float = 60) -> dict[int, Any]:
        """Session i steps with sequence seqs[i], all at once; returns each reply or RpcError."""
        ids = self.ids[srv.name]
        futures = {
            i: srv.stub.Observe.future(
                pb.ObserveRequest(session_id=ids[i], sequence=seq, rows=self.rows(i, seq)), timeout=timeout
            )
            for i, seq in seqs.items()
        }
        out: dict[int, Any] = {}
        for i, f in futures.items():
            try:
                out[i] = f.result()
            except grpc.RpcError as e:
                out[i] = e
        return out

    def reference(self, ref: Server, seq: int) -> None:
        for i, r in enumerate(self.step(ref, [seq] * self.n)):
            assert not isinstance(r, grpc.RpcError), r
            self.answers[(i, seq)] = _array(r.forecast).tobytes()

    def same(self, i: int, seq: int, reply: Any) -> bool:
        return not isinstance(reply, grpc.RpcError) and _array(reply.forecast).tobytes() == self.answers[(i, seq)]

    def expected(self, srv: Server) -> list[int | None]:
        """The sequence number the server expects next per session (None: session not found)."""
        out: list[int | None] = []
        for r in self.step(srv, [U64] * self.n):
            assert isinstance(r, grpc.RpcError), "a sequence of 2**64-1 was accepted"
            m = re.search(r"expected (\d+)", r.details() or "")
            out.append(int(m.group(1)) if r.code() == grpc.StatusCode.FAILED_PRECONDITION and m else None)
        return out


def run_sigterm(ref: Server, repo: Path, tmp: Path, values: np.ndarray, n: int, rounds: int) -> dict[str, Any]:
    snap = tmp / "sigterm.snap"
    # a queue delay keeps the last round's steps queued when SIGTERM arrives: they are drained, then saved
    env = {
        "GATECAST_SNAPSHOT_PATH": str(snap),
        "GATECAST_SNAPSHOT_INTERVAL_S": "3600",
        "GATECAST_MAX_QUEUE_DELAY_MS": "150",
    }
    srv = Server("sigterm", repo, env)
    fleet = Fleet(values, n)
    fleet.open(srv)
    fleet.open(ref)
    mismatches = 0
    for seq in range(1, rounds + 1):
        fleet.reference(ref, seq)
        mismatches += sum(not fleet.same(i, seq, r) for i, r in enumerate(fleet.step(srv, [seq] * n)))
    last = rounds + 1
    fleet.reference(ref, last)
    results: list[Any] = []
    sender = threading.Thread(target=lambda: results.extend(fleet.step(srv, [last] * n, timeout=30)))
    sender.start()
    time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    sender.join()  # every step answered or refused before the client's channel closes
    exit_code = srv.proc.wait(timeout=60)
    srv.channel.close()
    acked = [not isinstance(r, grpc.RpcError) for r in results]
    refused = Counter(r.code().name for r in results if isinstance(r, grpc.RpcError))
    mismatches += sum(not fleet.same(i, last, r) for i, r in enumerate(results) if acked[i])
    srv.start()
    expected = fleet.expected(srv)
    lost = 0
    for i, e in enumerate(expected):
        if e is None or (acked[i] and e != last + 1) or e not in (last, last + 1):
            lost += 1
    # every client continues at the number it is told; a retry of the last applied step gets its answer again
    for seq in range(last, last + 4):
        if seq > last:
            fleet.reference(ref, seq)
        replies = fleet.step(srv, [seq] * n)
        mismatches += sum(not fleet.same(i, seq, r) for i, r in enumerate(replies) if expected[i] is not None)
    srv.stop()
    return {
        "sessions": n,
        "steps_before": rounds,
        "steps_acknowledged_of_the_round_in_flight_at_sigterm": sum(acked),
        "answers_to_the_rest_of_that_round": dict(refused),
        "unacknowledged_steps_applied_in_the_drain": sum(
            e == last + 1 for e, a in zip(expected, acked, strict=True) if not a
        ),
        "exit_code": exit_code,
        "restored": sum(e is not None for e in expected),
        "lost": lost,
        "answer_mismatches": mismatches,
    }


def run_kill9(ref: Server, repo: Path, tmp: Path, values: np.ndarray, n: int, rounds: int) -> dict[str, Any]:
    snap = tmp / "kill9.snap"
    interval = 1.0
    env = {"GATECAST_SNAPSHOT_PATH": str(snap), "GATECAST_SNAPSHOT_INTERVAL_S": str(interval)}
    srv = Server("kill9", repo, env)
    fleet = Fleet(values, n)
    fleet.open(srv)
    fleet.open(ref)
    mismatches = 0
    for seq in range(1, rounds + 1):
        fleet.reference(ref, seq)
        mismatches += sum(not fleet.same(i, seq, r) for i, r in enumerate(fleet.step(srv, [seq] * n)))
    ids = set(fleet.ids["kill9"])
    end = time.monotonic() + 10 * interval + 10
    while {r.id for r in read_file(snap) if r.last_seq == rounds} != ids:  # a snapshot holds every session
        assert time.monotonic() < end, "no periodic snapshot held every session"
        time.sleep(0.05)
    after = 3  # steps after that snapshot, acknowledged to the clients, then the crash
    for seq in range(rounds + 1, rounds + after + 1):
        fleet.reference(ref, seq)
        mismatches += sum(not fleet.same(i, seq, r) for i, r in enumerate(fleet.step(srv, [seq] * n)))
    acked = rounds + after
    killed_at = time.time()
    srv.proc.kill()
    srv.proc.wait(timeout=30)
    srv.channel.close()
    saved = {r.id: r.last_seq for r in read_file(snap)}
    snapshot_age = killed_at - snap.stat().st_mtime
    srv.start()
    expected = fleet.expected(srv)
    lost = 0
    resent = 0
    for i, sid in enumerate(fleet.ids["kill9"]):
        e = expected[i]
        if sid not in saved or e is None or e != saved[sid] + 1:
            lost += 1
            expected[i] = None
        else:
            resent += acked - saved[sid]
    # each client retries its last saved step (same answer), then resends everything after it, then goes on
    first = min((e - 1 for e in expected if e is not None), default=acked)
    for seq in range(max(1, first), acked + 3):
        if seq > acked:
            fleet.reference(ref, seq)
        due = {i: seq for i, e in enumerate(expected) if e is not None and e - 1 <= seq}
        mismatches += sum(not fleet.same(i, seq, r) for i, r in fleet.step_some(srv, due).items())
    srv.stop()
    return {
        "sessions": n,
        "snapshot_interval_s": interval,
        "steps_in_the_snapshot": rounds,
        "steps_acknowledged_after_it": after,
        "snapshot_age_at_kill_s": round(snapshot_age, 2),
        "steps_lost_and_resent": resent,
        "restored": sum(e is not None for e in expected),
        "lost": lost,
        "answer_mismatches": mismatches,
    }


# --- 4. latency of small requests beside a maximal one ------------------------------------------------------


def run_latency(repo: Path, values: np.ndarray, samples: int) -> dict[str, Any]:
    srv = Server("latency", repo, {})
    call = srv.raw("Forecast")
    smalls = [
        pb.ForecastRequest(model="taylor", series=[_matrix(values[i : i + CONTEXT])]).SerializeToString()
        for i in range(0, 3000, 37)
    ]
    n_series, n_rows = 10, 100_000  # GATECAST_MAX_ROWS per series, GATECAST_MAX_REQUEST_ROWS in all
    long = np.tile(values, (n_rows // len(values) + 1, 1))
    big = pb.ForecastRequest(
        model="taylor", series=[_matrix(long[97 * i : 97 * i + n_rows]) for i in range(n_series)]
    ).SerializeToString()

    def small(k: int) -> float:
        t0 = time.perf_counter()
        call(smalls[k % len(smalls)], timeout=60)
        return time.perf_counter() - t0

    for k in range(50):  # warm up
        small(k)
    idle = [small(k) for k in range(samples)]
    running = threading.Event()
    stop = threading.Event()
    big_seconds: list[float] = []
    big_errors: list[str] = []

    def hammer() -> None:
        while not stop.is_set():
            running.set()
            t0 = time.perf_counter()
            try:
                pb.ForecastResponse.FromString(call(big, timeout=120))
                big_seconds.append(time.perf_counter() - t0)
            except grpc.RpcError as e:
                big_errors.append(f"{e.code().name}: {e.details()}")
                return
            finally:
                running.clear()

    worker = threading.Thread(target=hammer)
    worker.start()
    busy: list[float] = []
    end = time.monotonic() + 60
    k = 0
    while len(busy) < samples and time.monotonic() < end and worker.is_alive():
        if not running.wait(1):
            continue
        t = small(k)
        k += 1
        if running.is_set():  # the big request was still running when the answer came
            busy.append(t)
    stop.set()
    worker.join(180)
    srv.stop()
    p99_idle, p99_busy = _pct(idle, 99), _pct(busy, 99)
    return {
        "small_request": f"Forecast, 1 series x {CONTEXT} rows",
        "maximal_request": f"Forecast, {n_series} series x {n_rows:,} rows ({len(big) / 1e6:.1f} MB)",
        "maximal_requests_run": len(big_seconds),
        "maximal_request_seconds": [round(s, 2) for s in big_seconds],
        "maximal_request_errors": big_errors,
        "idle": {"n": len(idle), "p50_ms": _pct(idle, 50), "p99_ms": p99_idle},
        "busy": {"n": len(busy), "p50_ms": _pct(busy, 50), "p99_ms": p99_busy},
        "p99_ratio_busy_to_idle": p99_busy / p99_idle,
    }


# --- report --------------------------------------------------------------------------------------------------


def print_table(r: dict[str, Any]) -> None:
    c, s, k, lat = r["corpus"], r["sigterm"], r["kill9"], r["latency"]
    print(f"gatecast reliability | {r['model']} | {r['machine']} | {r['seconds']:.0f} s\n")
    print(
        f"hostile corpus: {c['cases']} cases ({c['streams']} streams of {c['stream_messages']} messages) "
        f"in {c['seconds']} s"
    )
    print(f"{'method':<16}{'answers':>8}  statuses")
    for method, counts in c["statuses"].items():
        print(f"{method:<16}{sum(counts.values()):>8}  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(
        f"unclear statuses or messages: {len(c['unclear'])}; unanswered stream messages: "
        f"{c['stream_messages_unanswered']}; not SERVING after a case: {c['not_serving_after_a_case']}; "
        f"canary mismatches: {c['canary_mismatches']} of {c['canary_checks']} checks; "
        f"SIGTERM exit code after fuzzing: {c['sigterm_exit_code_after_fuzzing']}\n"
    )
    rows = [
        ("crashes (server process deaths)", r["crashes"], "0"),
        (f"  unclear answers in the hostile corpus ({c['cases']} cases)", len(c["unclear"]), "0"),
        ("  canary forecasts differing from its twin's", c["canary_mismatches"], "0"),
        (
            f"sessions lost across SIGTERM ({s['sessions']} sessions, exit {s['exit_code']})",
            s["lost"],
            "0",
        ),
        ("  answers differing from the never-restarted reference", s["answer_mismatches"], "0"),
        (
            f"  steps in flight at SIGTERM: answered / applied unanswered (of {s['sessions']})",
            f"{s['steps_acknowledged_of_the_round_in_flight_at_sigterm']}/"
            f"{s['unacknowledged_steps_applied_in_the_drain']}",
            "-",
        ),
        (
            f"sessions lost across kill -9 beyond the snapshot ({k['sessions']}, "
            f"interval {k['snapshot_interval_s']} s)",
            k["lost"],
            "0",
        ),
        ("  steps after the snapshot, resent by their clients", k["steps_lost_and_resent"], "-"),
        ("  answers differing from the never-restarted reference", k["answer_mismatches"], "0"),
        (f"small-request p99 idle, ms (n={lat['idle']['n']})", f"{lat['idle']['p99_ms']:.1f}", "-"),
        (f"small-request p99 during a maximal request, ms (n={lat['busy']['n']})", f"{lat['busy']['p99_ms']:.1f}", "-"),
        ("p99 ratio busy / idle", f"{lat['p99_ratio_busy_to_idle']:.2f}", "<= 2"),
    ]
    print(f"{'measure':<78}{'value':>8}{'goal':>8}")
    for name, value, goal in rows:
        print(f"{name:<78}{value!s:>8}{goal:>8}")
    print(
        f"\nmaximal request: {lat['maximal_request']}, {lat['maximal_requests_run']} run(s): "
        f"{lat['maximal_request_seconds']} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200, help="sessions per restart experiment")
    ap.add_argument("--rounds", type=int, default=5, help="steps per session before the restart")
    ap.add_argument("--samples", type=int, default=1000, help="small requests per latency figure")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability.json")
    args = ap.parse_args()
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    try:
        result = measure(args, values, rng)
    finally:
        for proc in STARTED:  # none outlives the run, whatever failed
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")


def _progress(phase: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {phase}...", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, values: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gatecast-reliability-") as tmp_name:
        tmp = Path(tmp_name)
        repos = {}
        for name in ("reference", "served"):
            repos[name] = tmp / name
            shutil.copytree(MODEL, repos[name] / "taylor")
        ref = Server("reference", repos["reference"], {"GATECAST_MAX_SESSIONS": "100000"})
        try:
            _progress("hostile corpus")
            corpus = run_corpus(ref, repos["served"], rng, values)
            _progress("SIGTERM")
            sigterm = run_sigterm(ref, repos["served"], tmp, values, args.sessions, args.rounds)
            _progress("kill -9")
            kill9 = run_kill9(ref, repos["served"], tmp, values, args.sessions, args.rounds)
            ref_alive = ref.alive()
        finally:
            ref.stop()
        _progress("latency")
        latency = run_latency(repos["served"], values, args.samples)
    return {
        "model": "taylor v1 (models/taylor, gru 1x32, context 432, horizon 48)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU provider; client and servers share the cores",
        "seconds": 0.0,
        "crashes": corpus["crashes"] + (0 if ref_alive else 1),
        "sessions_lost_sigterm": sigterm["lost"],
        "sessions_lost_kill9_beyond_snapshot": kill9["lost"],
        "p99_ratio_busy_to_idle": latency["p99_ratio_busy_to_idle"],
        "corpus": corpus,
        "sigterm": sigterm,
        "kill9": kill9,
        "latency": latency,
    }


if __name__ == "__main__":
    main()
