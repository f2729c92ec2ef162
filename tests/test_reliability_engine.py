"""Issue 7, engine side, against the real server on loopback: one session's state never reaches another,
every batched item is answered whatever fails, and no request holds the others hostage.

Failures that need a slow or failing model run come from a runtime double (`RuntimeDouble`) installed on
a loaded model version; the gRPC side stays real.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gatecast import SESSION_HEADER
from gatecast.graph import zero_states
from gatecast.manifest import Manifest
from gatecast.service.batcher import PREFETCH_MAX_RUN_S
from gatecast.service.repository import ModelVersion
from gatecast.service.sessions import Session
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, RunningServer, array, matrix, server_settings, taylor_values

RTOL = 1e-4


@pytest.fixture(scope="module")
def taylor_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the committed default model: no training, so these tests start in about a second."""
    repo = tmp_path_factory.mktemp("reliability")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    return repo


@contextlib.contextmanager
def serve(repo: Path, **settings: Any) -> Iterator[RunningServer]:
    srv = RunningServer(server_settings(repo, **settings))
    try:
        yield srv
    finally:
        srv.stop()


def version(srv: RunningServer, name: str = "taylor") -> ModelVersion:
    return srv.app.repo.resolve(name)


class RuntimeDouble:
    """Stands in for `ModelRuntime.run` on one loaded version: can hold runs at a gate, slow them down,
    or raise; otherwise runs the real graph."""

    def __init__(self, mv: ModelVersion) -> None:
        self.mv = mv
        self.real = mv.runtime.run
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()  # a run reached the gate
        self.delay = 0.0
        self.fail: Callable[[np.ndarray], bool] = lambda x: False
        self.runs: list[tuple[int, int]] = []  # (batch, time) of each run

    def __call__(self, x: np.ndarray, states: list[np.ndarray]) -> Any:
        self.runs.append((x.shape[0], x.shape[1]))
        self.started.set()
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail(x):
            raise RuntimeError("injected model failure")
        return self.real(x, states)

    def __enter__(self) -> RuntimeDouble:
        self.mv.runtime.run = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        del self.mv.runtime.run  # back to the class's method


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def reference(folder: Path, x: np.ndarray) -> np.ndarray:
    m = Manifest.read(folder)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"x": x[None].astype(np.float32)}
    feed.update(zero_states(m.states, 1))
    return sess.run(["y"], feed)[0][0]  # type: ignore[no-any-return]


@contextlib.contextmanager
def gated(repo: Path) -> Iterator[tuple[RunningServer, pb_grpc.ForecasterStub, ModelVersion, RuntimeDouble]]:
    """A server whose model runs wait at a closed gate until the test opens it (`rt.gate.set()`): the server,
    a stub, the model version and its runtime double, `started` once a run has reached the gate."""
    with serve(repo) as srv, grpc.insecure_channel(srv.address) as ch:
        mv = version(srv)
        with RuntimeDouble(mv) as rt:
            rt.gate.clear()
            rt.started.clear()
            yield srv, pb_grpc.ForecasterStub(ch), mv, rt


# --- one session's state must never reach another -------------------------------------------------------


def test_cancelled_open_session_keeps_its_slot_until_the_warmup_wrote_it(taylor_repo: Path) -> None:
    """OpenSession with a history is cancelled while its warm-up step runs; the next OpenSession must not
    get that slot and then start from the stranger's state the warm-up writes."""
    values = taylor_values()
    with gated(taylor_repo) as (srv, stub, mv, rt):
        used = mv.pool.used
        pending = stub.OpenSession.future(pb.OpenSessionRequest(model="taylor", history=matrix(values[:2000])))
        assert rt.started.wait(10), "the warm-up step never ran"
        pending.cancel()
        wait_for(lambda: len(srv.app.sessions) == 0)  # the server has dropped the cancelled session
        assert mv.pool.used == used + 1, "the slot was freed while the warm-up step could still write it"
        other = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        rt.gate.set()  # the warm-up finishes (all its chunks) and writes its state
        wait_for(lambda: mv.batcher.queued_rows == 0)
        assert mv.pool.used == used + 1  # now the cancelled session's slot is free: only `other` holds one
        row = values[3000:3001]
        got = array(stub.Observe(pb.ObserveRequest(session_id=other, sequence=1, rows=matrix(row))).forecast)
        fresh = array(stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(row)])).forecasts[0])
        np.testing.assert_allclose(got, fresh, rtol=1e-5)  # from zero, not from the stranger's warm-up
        stub.CloseSession(pb.CloseSessionRequest(session_id=other))
        assert mv.pool.used == used


def test_a_session_closed_while_its_history_runs_leaves_nothing_to_the_next_one(taylor_repo: Path) -> None:
    """Found by a hostile client: OpenSession with a proposed id and a history, CloseSession of that id while
    the history ran. The open went on to add the history's rows to the freed slot's step count and answered
    OK; the next session to get the slot closed with 20,000 steps it never took. Now the open answers
    NOT_FOUND and the next session starts from nothing."""
    values = taylor_values()
    sid = "ab" * 16
    with gated(taylor_repo) as (_, stub, _, rt):
        opening = stub.OpenSession.future(
            pb.OpenSessionRequest(model="taylor", history=matrix(values[:2000])), metadata=((SESSION_HEADER, sid),)
        )
        assert rt.started.wait(10), "the history never ran"
        closing = stub.CloseSession.future(pb.CloseSessionRequest(session_id=sid))  # waits for the history
        time.sleep(0.2)
        rt.gate.set()
        assert closing.result(timeout=30).steps == 0  # the history had not been counted yet
        with pytest.raises(grpc.RpcError) as e:
            opening.result(timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "closed while its history" in str(e.value.details())
        other = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        assert stub.CloseSession(pb.CloseSessionRequest(session_id=other)).steps == 0


def test_a_commit_that_raises_still_answers_every_item(taylor_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(taylor_repo, max_queue_delay_ms=20.0) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        ids = [stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id for _ in range(4)]
        victim = ids[0]
        real = Session.committer

        def committer(self: Session, seq: int, rows: int, digest: bytes = b"") -> Any:
            commit = real(self, seq, rows, digest)
            if self.id != victim:
                return commit

            def boom(out: Any) -> None:
                raise RuntimeError("injected commit failure")

            return boom

        monkeypatch.setattr(Session, "committer", committer)
        row = matrix(np.array([[30000.0]]))
        calls = [stub.Observe.future(pb.ObserveRequest(session_id=s, sequence=1, rows=row), timeout=10) for s in ids]
        with pytest.raises(grpc.RpcError) as failed:
            calls[0].result()
        assert failed.value.code() == grpc.StatusCode.INTERNAL  # answered, not left waiting to the deadline
        for c in calls[1:]:  # the others in the same batch were answered too
            assert c.result().sequence == 1
        monkeypatch.setattr(Session, "committer", real)
        # the victim is not stuck "busy": its next call is served, and the step was neither recorded nor
        # applied (the state the run wrote was put back): the resend answers as a fresh session's first step
        again = stub.Observe(pb.ObserveRequest(session_id=victim, sequence=1, rows=row), timeout=10)
        assert again.sequence == 1
        twin = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        fresh = stub.Observe(pb.ObserveRequest(session_id=twin, sequence=1, rows=row), timeout=10)
        np.testing.assert_allclose(array(again.forecast), array(fresh.forecast), rtol=1e-6, atol=1e-6)


def test_a_dispatch_that_fails_after_taking_items_answers_them(taylor_repo: Path) -> None:
    """Handing the batch to the worker fails (as a shut-down executor would) after its items left the queue."""
    with serve(taylor_repo) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        mv = version(srv)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        real = mv.batcher._jobs

        class Refusing:
            def put(self, *a: object, **k: object) -> None:
                mv.batcher._jobs = real  # once
                raise RuntimeError("cannot schedule new futures after shutdown")

        mv.batcher._jobs = Refusing()  # type: ignore[assignment]
        row = matrix(np.array([[30000.0]]))
        with pytest.raises(grpc.RpcError) as failed:
            stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=row), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=row), timeout=10).sequence == 1


def test_a_failed_run_leaves_the_session_state_as_it_was(taylor_repo: Path) -> None:
    """A long observation runs in chunks; when a later chunk fails, nothing of it reaches the session."""
    values = taylor_values()
    with serve(taylor_repo, chunk_rows=128) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:500]))).session_id
        with RuntimeDouble(version(srv)) as rt:
            rt.fail = lambda x: len(rt.runs) == 3  # the third chunk of the step below
            with pytest.raises(grpc.RpcError) as failed:
                stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(values[500:1000])))
            assert failed.value.code() == grpc.StatusCode.INTERNAL
        reply = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(values[500:1000])))
        whole = array(stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:1000])])).forecasts[0])
        np.testing.assert_allclose(array(reply.forecast), whole, rtol=RTOL)


# --- no request holds the others hostage ----------------------------------------------------------------


def _small_latencies(stub: pb_grpc.ForecasterStub, x: np.ndarray, until: Callable[[], bool], n: int) -> list[float]:
    out: list[float] = []
    while len(out) < n and not until():
        t0 = time.perf_counter()
        stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(x)]), timeout=30)
        out.append(time.perf_counter() - t0)
    return out


def test_a_maximal_forecast_interleaves_with_small_requests(taylor_repo: Path) -> None:
    """A request at the row cap (60 series x 5,000 rows = 300k rows) is split into chunks; small requests
    sent meanwhile are served between them instead of waiting for all of it; the answers are the same as
    whole-window runs."""
    values = np.tile(taylor_values(), (3, 1))
    n_series, n_rows = 60, 5000
    big = [values[97 * i : 97 * i + n_rows] for i in range(n_series)]
    window = values[-432:]
    with serve(taylor_repo, max_request_rows=n_series * n_rows) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        mv = version(srv)
        idle = _small_latencies(stub, window, lambda: False, 40)
        result: dict[str, Any] = {}

        def run_big() -> None:
            t0 = time.perf_counter()
            with grpc.insecure_channel(srv.address) as ch2:
                reply = pb_grpc.ForecasterStub(ch2).Forecast(
                    pb.ForecastRequest(model="taylor", series=[matrix(b) for b in big]), timeout=120
                )
            result["reply"], result["seconds"] = reply, time.perf_counter() - t0

        with RuntimeDouble(mv) as rt:
            worker = threading.Thread(target=run_big)
            worker.start()
            wait_for(lambda: mv.batcher.queued_rows > 0)
            busy = _small_latencies(stub, window, lambda: not worker.is_alive(), 1000)
            worker.join(120)
        assert "reply" in result
        longest_run = max(b * t for b, t in rt.runs)
        assert longest_run <= srv.app.settings.max_batch_rows  # no run held more than a batch's rows
        assert len(busy) >= 10, f"only {len(busy)} small requests answered during the {result['seconds']:.2f} s run"
        p50_idle, p50_busy = statistics.median(idle), statistics.median(busy)
        p99_idle = float(np.percentile(idle, 99))
        p99_busy = float(np.percentile(busy, 99))
        print(
            f"\nbig request {n_series}x{n_rows} rows: {result['seconds']:.2f} s; small requests idle "
            f"p50 {p50_idle * 1e3:.1f} ms p99 {p99_idle * 1e3:.1f} ms; during the big one (n={len(busy)}) "
            f"p50 {p50_busy * 1e3:.1f} ms p99 {p99_busy * 1e3:.1f} ms"
        )
        assert p99_busy < result["seconds"] / 4, "small requests waited for a large part of the big one"
        folder = taylor_repo / "taylor" / "1"
        for i in (0, n_series - 1):  # chunked with carried state == the whole window in one run
            np.testing.assert_allclose(array(result["reply"].forecasts[i]), reference(folder, big[i]), rtol=RTOL)


def test_a_small_request_rides_in_the_next_run_behind_a_big_one(taylor_repo: Path) -> None:
    """Deterministic: the worker is held inside the big request's first run while a small request
    arrives; at most one more batch of the big request's pieces runs before the small one."""
    values = np.tile(taylor_values(), (2, 1))
    with gated(taylor_repo) as (srv, stub, mv, rt):
        big = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[matrix(values[:2000])] * 8))
        assert rt.started.wait(10)
        small = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[matrix(values[:432])]))
        wait_for(lambda: mv.batcher.queued_rows == 16_000 + 432)
        rt.gate.set()
        small.result(timeout=30)
        big.result(timeout=30)
        first_small = next(i for i, (b, t) in enumerate(rt.runs) if (b, t) == (1, 432))
        before = sum(b * t for b, t in rt.runs[:first_small])
        assert before <= 2 * srv.app.settings.max_batch_rows, f"{before} rows of the big request ran first"
        assert max(b * t for b, t in rt.runs) <= srv.app.settings.max_batch_rows


def test_request_cost_cap_and_a_queue_that_counts_rows(taylor_repo: Path) -> None:
    values = np.tile(taylor_values(), (2, 1))
    settings = dict(max_queue_rows=20_000, max_request_rows=50_000, max_queue_size=4096, max_queue_delay_ms=1.0)
    with serve(taylor_repo, **settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        mv = version(srv)

        def gauge() -> float | None:
            return srv.app.metrics.registry.get_sample_value(
                "gatecast_queued_rows", {"model": "taylor", "version": "1"}
            )

        # one request may hold at most half of the queue, whatever max_request_rows says
        with pytest.raises(grpc.RpcError) as big:
            stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:6000])] * 2))
        assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "12000 rows in one request" in big.value.details() and "at most 10000" in big.value.details()
        assert "GATECAST_MAX_REQUEST_ROWS" in big.value.details()
        with RuntimeDouble(mv) as rt:
            rt.gate.clear()  # the worker is stuck: what is admitted stays queued
            # 4,096 one-row series are 4,096 rows of work, not a full queue of 4,096 items
            many = stub.Forecast.future(
                pb.ForecastRequest(model="taylor", series=[matrix(values[i : i + 1]) for i in range(4096)])
            )
            wait_for(lambda: mv.batcher.queued_rows == 4096)
            small = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[matrix(values[:432])]))
            wait_for(lambda: mv.batcher.queued_rows == 4096 + 432)
            first = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[matrix(values[:8000])]))
            wait_for(lambda: mv.batcher.queued_rows == 4096 + 432 + 8000)
            wait_for(lambda: gauge() == 4096 + 432 + 8000)  # set just after the count: read it when it is
            with pytest.raises(grpc.RpcError) as full:  # 12,528 + 8,000 rows would pass the 20,000 bound
                stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:8000])]), timeout=10)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rows" in full.value.details()
            rt.gate.set()
            assert len(many.result(timeout=30).forecasts) == 4096
            assert len(small.result(timeout=30).forecasts) == 1
            assert len(first.result(timeout=30).forecasts) == 1
        wait_for(lambda: mv.batcher.queued_rows == 0)
        wait_for(lambda: gauge() == 0)  # the gauge follows the queue as batches leave it (set once per batch)


def test_memory_is_given_back_after_a_big_run(taylor_repo: Path) -> None:
    """A maximal request leaves the process (server and client in one) not much larger than before."""

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    values = np.tile(taylor_values(), (3, 1))
    n_series, n_rows = 10, 100_000
    series = [matrix(values[1000 * i : 1000 * i + n_rows]) for i in range(n_series)]
    limits = dict(max_request_rows=n_series * n_rows, max_queue_rows=4 * n_series * n_rows)
    with serve(taylor_repo, **limits) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        stub.Forecast(pb.ForecastRequest(model="taylor", series=series[:1]), timeout=60)
        before = rss_mb()
        reply = stub.Forecast(pb.ForecastRequest(model="taylor", series=series), timeout=120)
        assert len(reply.forecasts) == n_series
        del reply
        after = rss_mb()
    print(f"\nRSS before a {n_series}x{n_rows}-row Forecast {before:.0f} MiB, after {after:.0f} MiB")
    assert after - before < 150, f"the process grew by {after - before:.0f} MiB after one request"


def _batches_taken(srv: RunningServer) -> float:
    value = srv.app.metrics.registry.get_sample_value("gatecast_batch_size_count", {"model": "taylor", "version": "1"})
    return value or 0.0


@pytest.mark.parametrize(("last_run_s", "handed"), [(0.0, True), (0.01, True), (2 * PREFETCH_MAX_RUN_S, False)])
def test_a_full_batch_is_handed_over_while_a_short_run_runs(taylor_repo: Path, last_run_s: float, handed: bool) -> None:
    """When runs are short, a full batch waiting is handed to the worker while it runs another, so the worker
    need not wait on the event loop between them; after a run longer than PREFETCH_MAX_RUN_S the next batch
    is taken only once the worker is free (a request arriving meanwhile rides in it, not one run later).
    10 ms is short: 512 one-row steps of an LSTM 2x64 take 3-10 ms beside the event loop and a client on two
    cores, and a bound of 5 ms turned the hand-over off for about half of such runs."""
    slow = not handed
    values = taylor_values()
    with serve(taylor_repo) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        mv = version(srv)
        one_row = [matrix(values[i : i + 1]) for i in range(1100)]  # 1,100 items: more than two full batches
        with RuntimeDouble(mv) as rt:
            stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:10])]), timeout=30)
            # how long the last run took, as the worker records it (set here: a loaded machine may stretch
            # any real run past the bound); nothing overwrites it while the worker is held below
            mv.batcher._last_run_s = last_run_s
            rt.gate.clear()
            rt.started.clear()
            plug = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[matrix(values[:10])]), timeout=30)
            assert rt.started.wait(10)  # the worker is held inside the plug's run
            taken = _batches_taken(srv)
            many = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=one_row), timeout=30)
            wait_for(lambda: mv.batcher.queued_rows >= 1100)
            if slow:
                time.sleep(0.3)
                assert _batches_taken(srv) == taken  # nothing taken while the worker is busy
            else:
                wait_for(lambda: _batches_taken(srv) == taken + 1)  # one full batch handed over ...
                time.sleep(0.3)
                assert _batches_taken(srv) == taken + 1  # ... and no more than one
            rt.gate.set()
            plug.result()
            answers = many.result().forecasts
        assert len(answers) == 1100
        alone = stub.Forecast(pb.ForecastRequest(model="taylor", series=one_row[1099:]), timeout=30).forecasts[0]
        np.testing.assert_array_equal(array(answers[1099]), array(alone))
