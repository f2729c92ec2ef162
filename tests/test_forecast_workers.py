"""Forecast workers (service/forecast_pool.py): unary Forecast answered by worker processes.

A server with one worker and a server without, on the same repository and limits: every answer's bytes
and every refusal's status and words must be the same. Then the failure paths on the server with a
worker: a worker stopped (SIGSTOP) holds requests, is killed, or is full; a caller's deadline passes while
its request is in a worker; models follow the repository; SIGTERM drains and reaps the worker."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gatecast.manifest import Manifest
from gatecast.service.batcher import Output
from gatecast.service.oneshot import (
    forecast_head,
    forecast_inputs,
    forecast_response,
    forecast_response_bytes,
    forecast_series,
)
from gatecast.service.settings import Settings
from gatecast.v1 import forecaster_pb2 as pb
from tests.conftest import DEFAULT_MODEL, ROOT, RunningServer, matrix, server_settings, taylor_values
from tests.test_reliability_api import _quantile_model
from tests.test_reliability_engine import wait_for

FORECAST = "/gatecast.v1.Forecaster/Forecast"
INFER = "/inference.GRPCInferenceService/ModelInfer"
LIMITS: dict[str, Any] = {"max_series": 8, "max_rows": 1000, "max_request_rows": 2000, "chunk_rows": 64}
Answer = tuple[str, Any]  # ("OK", bytes) or (status code name, details)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Path:
    repo = tmp_path_factory.mktemp("workers")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    shutil.copytree(model_repo / "tiny_lstm", repo / "tiny_lstm")
    _quantile_model(repo / "qsum" / "1", [0.1, 0.5, 0.9])
    _failing_model(repo / "fails" / "1")
    return repo


@pytest.fixture(scope="module")
def pair(repo: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    """(with one worker, without); the same settings otherwise."""
    pooled = RunningServer(server_settings(repo, forecast_workers=1, max_queue_size=3, **LIMITS))
    plain = RunningServer(server_settings(repo, forecast_workers=0, max_queue_size=3, **LIMITS))
    try:
        assert ready(pooled)
        yield pooled, plain
    finally:
        pooled.stop()
        plain.stop()


def _failing_model(folder: Path) -> None:
    """The quantile test graph, failing its run (onnxruntime raises) when a series holds a value <= -1:
    a ConstantOfShape of that many elements, whose sum (0) is added to y."""
    import onnx
    from onnx import TensorProto, helper

    from gatecast.manifest import ONNX_FILE, Manifest, sha256_file

    _quantile_model(folder, [0.5])
    model = onnx.load(str(folder / ONNX_FILE))
    graph = model.graph
    expand = next(n for n in graph.node if n.op_type == "Expand")
    expand.output[0] = "yraw"
    graph.initializer.extend(
        [
            helper.make_tensor("four", TensorProto.FLOAT, [], [4.0]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ]
    )
    at = list(graph.node).index(expand) + 1
    for k, node in enumerate(
        [
            helper.make_node("ReduceMin", ["x"], ["xmin"], keepdims=0),
            helper.make_node("Min", ["xmin", "four"], ["small"]),
            helper.make_node("Cast", ["small"], ["count"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["count", "one"], ["shape"]),
            helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),  # fails for a negative count
            helper.make_node("ReduceSum", ["zeros"], ["zsum"], keepdims=0),
            helper.make_node("Add", ["yraw", "zsum"], ["y"]),
        ]
    ):
        graph.node.insert(at + k, node)
    onnx.save(model, str(folder / ONNX_FILE))
    manifest = Manifest.read(folder).model_dump()
    manifest["name"] = "fails"
    manifest["onnx"]["sha256"] = sha256_file(folder / ONNX_FILE)
    Manifest.model_validate(manifest).write(folder)


def ready(srv: RunningServer) -> bool:
    assert srv.app.forecasts is not None
    return bool(srv.call(srv.app.forecasts.ready(60)))


def call(srv: RunningServer, data: bytes, timeout: float | None = 30) -> Answer:
    with grpc.insecure_channel(srv.address) as ch:
        try:
            return "OK", ch.unary_unary(FORECAST)(data, timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name, e.details()


def path_count(srv: RunningServer, path: str) -> float:
    return srv.app.metrics.registry.get_sample_value("gatecast_forecast_path_total", {"path": path}) or 0.0


def pending(srv: RunningServer) -> int:
    assert srv.app.forecasts is not None

    async def count() -> int:
        assert srv.app.forecasts is not None
        return sum(len(w.pending) for w in srv.app.forecasts.workers)

    return int(srv.call(count()))


def worker_pid(srv: RunningServer) -> int:
    assert srv.app.forecasts is not None
    return int(srv.app.forecasts.workers[0].proc.pid)


def request(model: str, *histories: np.ndarray, version: int = 0) -> bytes:
    return pb.ForecastRequest(model=model, version=version, series=[matrix(h) for h in histories]).SerializeToString()


def test_answers_are_the_same_bytes_with_and_without_workers(pair: tuple[RunningServer, RunningServer]) -> None:
    pooled, plain = pair
    values = taylor_values()
    requests = [
        request("taylor", values[:432]),
        request("taylor", values[100:532], values[:50], values[7:300], version=1),  # chunked: 64-row pieces
        request("tiny_lstm", values[:48], values[48:96]),
        request("qsum", np.arange(12, dtype=np.float32)[:, None], np.ones((5, 1), np.float32)),  # quantiles
        request("taylor", values[:20]) + b"\x20\x01",  # an unknown field: decoded in the main process
        request("taylor", values[:20]) + b"\x10\x80\x80\x80\x80\x10",  # version 2**32: 0 to protobuf
    ]
    before = path_count(pooled, "worker")
    for data in requests:
        got, want = call(pooled, data), call(plain, data)
        assert got[0] == "OK" and got == want
    assert path_count(pooled, "worker") == before + len(requests) - 2  # the worker answered all but the odd two


def test_refusals_are_the_same_with_and_without_workers(pair: tuple[RunningServer, RunningServer]) -> None:
    pooled, plain = pair
    row = np.ones((3, 1), np.float32)
    nan = row.copy()
    nan[1, 0] = np.nan
    good = pb.ForecastRequest(model="taylor", series=[matrix(row)]).SerializeToString()
    bad = [
        pb.ForecastRequest(model="taylor").SerializeToString(),  # no series
        request("taylor", np.ones((3, 2), np.float32)),  # wrong columns
        request("taylor", np.ones((1001, 1), np.float32)),  # too many rows in a series
        request("taylor", *[np.ones((300, 1), np.float32)] * 7),  # too many rows in the request
        request("taylor", *[row] * 9),  # too many series
        request("taylor", nan),
        pb.ForecastRequest(model="taylor", series=[pb.Matrix(rows=3, cols=1, values=[1, 2])]).SerializeToString(),
        request("nope", row),
        request("taylor", row, version=7),
        request("x" * 65, row),
        good[:-3],  # cut short: malformed (decoded in the main process)
        b"\x0a\x06taylor\x1a\x01\x08",  # a series cut inside: malformed (decoded by the worker)
        b"\x0a\x04nope\x1a\x01\x08",  # unknown model and a malformed series: malformed wins, as without workers
        b"\x0a\x02\xff\xfe" + good[8:],  # a model name that is not UTF-8
        b"\x0a\x01\xff" + good,  # an earlier copy of the name that is not UTF-8: protobuf refuses any copy
        good + b"\x0a\x03\xed\xa0\x80" + good[:8],  # a surrogate in a copy between the series and the last
    ]
    for data in bad:
        got, want = call(pooled, data), call(plain, data)
        assert got[0] != "OK" and got == want, data

    def counted(srv: RunningServer) -> dict[tuple[str, str], float]:
        return {
            (s.labels["model"], s.labels["code"]): s.value
            for m in srv.app.metrics.registry.collect()
            if m.name == "gatecast_requests"
            for s in m.samples
            if s.name == "gatecast_requests_total" and s.labels["rpc"] == "Forecast" and s.value
        }

    assert counted(pooled) == counted(plain)  # the same model label and code for each
    assert counted(pooled)[("", "INVALID_ARGUMENT")] == 6  # the malformed ones count under no model
    for srv in pair:
        assert srv.app.metrics.registry.get_sample_value("gatecast_malformed_messages_total", {"rpc": "Forecast"}) == 6


def test_a_worker_killed_mid_flight_answers_unavailable_and_comes_back(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    pooled, plain = pair
    data = request("taylor", taylor_values()[:432])
    pid = worker_pid(pooled)
    os.kill(pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            held = ex.submit(call, pooled, data, None)  # no deadline: only the worker's end can answer it
            wait_for(lambda: pending(pooled) == 1)
            os.kill(pid, signal.SIGKILL)
            code, details = held.result(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # reaped already
            os.kill(pid, signal.SIGCONT)
    assert code == "UNAVAILABLE" and "ended while this request was in it" in details
    assert call(pooled, data) == call(plain, data)  # served in the main process meanwhile, or by the new worker
    assert ready(pooled) and worker_pid(pooled) != pid
    restarts = pooled.app.metrics.registry.get_sample_value("gatecast_forecast_worker_restarts_total")
    assert restarts is not None and restarts >= 1
    before = path_count(pooled, "worker")
    assert call(pooled, data) == call(plain, data)
    assert path_count(pooled, "worker") == before + 1


def test_a_full_worker_sends_the_rest_to_the_main_process_and_deadlines_cancel(
    pair: tuple[RunningServer, RunningServer],
) -> None:
    pooled, plain = pair
    data = request("taylor", taylor_values()[:432])
    pid = worker_pid(pooled)
    os.kill(pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            held = [ex.submit(call, pooled, data) for _ in range(3)]  # max_queue_size 3: the worker is full
            wait_for(lambda: pending(pooled) == 3)
            before = path_count(pooled, "process")
            assert call(pooled, data) == call(plain, data)  # answered by the main process while the worker is held
            assert path_count(pooled, "process") == before + 1
            for f in held:
                assert not f.done()
            os.kill(pid, signal.SIGCONT)
            answers = [f.result(timeout=30) for f in held]
        assert all(a == call(plain, data) for a in answers)
        wait_for(lambda: pending(pooled) == 0)
    finally:
        os.kill(pid, signal.SIGCONT)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        os.kill(pid, signal.SIGSTOP)
        try:
            late = ex.submit(call, pooled, data, 0.5)  # its deadline passes while the worker holds it
            wait_for(lambda: pending(pooled) == 1)
            assert late.result(timeout=30)[0] == "DEADLINE_EXCEEDED"
            wait_for(lambda: pending(pooled) == 0)  # while the worker is still stopped: the call let go of it
        finally:
            os.kill(pid, signal.SIGCONT)
    before = path_count(pooled, "worker")
    assert call(pooled, data) == call(plain, data)  # the worker dropped the expired request and serves on
    assert path_count(pooled, "worker") == before + 1
    assert worker_pid(pooled) == pid


@contextlib.contextmanager
def _stopped_worker(tmp_path: Path) -> Iterator[tuple[RunningServer, bytes, int]]:
    """A server whose worker is killed after 1 s without answers, with that worker stopped (SIGSTOP) and
    continued again afterwards: the server, a Forecast request's bytes and the stopped worker's pid. The
    server must have a new worker that serves by the end."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo, forecast_workers=1, forecast_worker_stall_s=1.0))
    try:
        assert ready(srv)
        data = request("taylor", taylor_values()[:432])
        assert call(srv, data)[0] == "OK"
        pid = worker_pid(srv)
        os.kill(pid, signal.SIGSTOP)
        try:
            yield srv, data, pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert ready(srv) and worker_pid(srv) != pid, "the stopped worker was never replaced"
        before = path_count(srv, "worker")
        assert call(srv, data)[0] == "OK" and path_count(srv, "worker") == before + 1
    finally:
        srv.stop()


def test_a_worker_that_answers_nothing_is_killed_and_its_calls_answered(tmp_path: Path) -> None:
    """A hung worker (here: stopped) holding a call without a deadline: the watchdog kills it after
    forecast_worker_stall_s, the call is answered UNAVAILABLE instead of waiting for ever, a new worker serves."""
    with _stopped_worker(tmp_path) as (srv, data, _):
        code, details = call(srv, data, 20)  # far past the stall: the watchdog answers it, not the deadline
        assert code == "UNAVAILABLE" and "ended while this request was in it" in details


def test_a_hung_worker_is_found_out_when_every_caller_gives_up_first(tmp_path: Path) -> None:
    """Found by a hostile client: callers with deadlines shorter than forecast_worker_stall_s each cancel their
    request before the stall is reached, the worker's line looked empty again, and the next request started
    the count afresh: a stopped worker was never killed. Cancelled requests still count until the worker
    acknowledges them."""
    with _stopped_worker(tmp_path) as (srv, data, pid):
        codes = []
        deadline = time.monotonic() + 30
        while worker_pid(srv) == pid and time.monotonic() < deadline:
            codes.append(call(srv, data, 0.4)[0])  # each gives up well before the 1 s stall
        assert codes.count("DEADLINE_EXCEEDED") >= 2  # callers gave up before the stall was reached


def test_request_ids_go_round_after_the_frames_32_bits(tmp_path: Path) -> None:
    """Found by a hostile review: ids counted on past 2**32 - 1 (weeks of traffic) failed to pack into the
    frame, and every Forecast through the worker answered INTERNAL from then on."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo, forecast_workers=1))
    try:
        assert ready(srv)
        assert srv.app.forecasts is not None
        w = srv.app.forecasts.workers[0]
        w._next_id = 2**32 - 3
        data = request("taylor", taylor_values()[:100])
        before = path_count(srv, "worker")
        expected = call(srv, data)
        assert expected[0] == "OK"
        assert all(call(srv, data) == expected for _ in range(5))
        assert path_count(srv, "worker") == before + 6 and 1 <= w._next_id <= 4  # went round, through the worker
    finally:
        srv.stop()


def test_a_small_request_is_not_held_behind_a_big_ones_many_batches(tmp_path: Path) -> None:
    """Found by a hostile client: the worker's lean line was one line of series, so a one-row Forecast sent
    after one of 2,000 short series waited for every batch of it (688 ms, against 5 ms in the main
    process). Requests now take turns as in the batcher: the small one is answered while the big one runs."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo, forecast_workers=1, max_message_mb=64, max_series=4096))
    try:
        assert ready(srv)
        values = taylor_values()
        big = request("taylor", *[values[:432]] * 2000)  # 432 rows each: one piece, the lean path
        small = request("taylor", values[:1])
        expected_small = call(srv, small)
        finished: list[str] = []

        def run_big() -> None:
            assert call(srv, big, 120)[0] == "OK"
            finished.append("big")

        before = path_count(srv, "worker")
        t = threading.Thread(target=run_big)
        t.start()
        while pending(srv) == 0:  # the big one is in the worker
            time.sleep(0.002)
        assert call(srv, small, 120) == expected_small
        big_still_in_the_worker = pending(srv)
        t.join()
        assert big_still_in_the_worker == 1 and finished == ["big"]
        assert path_count(srv, "worker") == before + 2  # both ran in the worker
    finally:
        srv.stop()


def test_workers_follow_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    srv = RunningServer(server_settings(repo, forecast_workers=1))
    try:
        assert ready(srv)
        staging = repo / "taylor" / ".staging"
        shutil.copytree(repo / "taylor" / "1", staging)
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["version"] = 2
        (staging / "manifest.json").write_text(json.dumps(manifest))
        os.rename(staging, repo / "taylor" / "2")
        data = request("taylor", taylor_values()[:432])
        wait_for(lambda: call(srv, data)[0] == "OK" and pb.ForecastResponse.FromString(call(srv, data)[1]).version == 2)
        assert ready(srv)  # the worker has loaded version 2 too
        before = path_count(srv, "worker")
        reply = pb.ForecastResponse.FromString(call(srv, data)[1])
        assert reply.version == 2 and path_count(srv, "worker") == before + 1
        shutil.rmtree(repo / "taylor" / "2")
        wait_for(lambda: pb.ForecastResponse.FromString(call(srv, data)[1]).version == 1)
        assert call(srv, request("taylor", taylor_values()[:432], version=2)) == (
            "NOT_FOUND",
            "model 'taylor' has no version 2; loaded versions: [1]",
        )
    finally:
        srv.stop()


def test_sigterm_finishes_forecasts_held_by_the_worker_and_reaps_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    env = {**os.environ, "GATECAST_PROVIDERS": '["CPUExecutionProvider"]', "GATECAST_FORECAST_WORKERS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatecast.cli", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def logged(pattern: str) -> Callable[[], re.Match[str] | None]:
        return lambda: next((m for line in list(log) if (m := re.search(pattern, line))), None)

    try:
        wait_for(lambda: logged(r"listening on [\d.]+:(\d+)")() is not None, 60)
        wait_for(lambda: logged(r"forecast worker 0 \(pid (\d+)\) serves taylor v1")() is not None, 60)
        listening = logged(r"listening on [\d.]+:(\d+) \(metrics on (\d+)\)")()
        assert listening is not None
        port, metrics_port = int(listening.group(1)), int(listening.group(2))

        def sent_to_worker() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            found = re.search(r'^gatecast_forecast_path_total\{path="worker"\} (\S+)$', text, re.M)
            return float(found.group(1)) if found else 0.0

        pid = int(logged(r"forecast worker 0 \(pid (\d+)\) serves")().group(1))  # type: ignore[union-attr]
        data = request("taylor", taylor_values()[:432])
        os.kill(pid, signal.SIGSTOP)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, concurrent.futures.ThreadPoolExecutor(2) as ex:
            held = [ex.submit(ch.unary_unary(FORECAST), data, timeout=30) for _ in range(2)]
            wait_for(lambda: sent_to_worker() == 2)  # both are in the stopped worker
            proc.send_signal(signal.SIGTERM)  # the worker ignores the signal; the main process drains
            os.kill(pid, signal.SIGTERM)  # as a service manager signalling the whole group would
            wait_for(lambda: logged(r"SIGTERM received: draining")() is not None)
            os.kill(pid, signal.SIGCONT)
            answers = [pb.ForecastResponse.FromString(f.result(timeout=30)) for f in held]
        assert [a.forecasts[0].rows for a in answers] == [48, 48]
        assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
        assert logged(rf"forecast worker 0 \(pid {pid}\) stopped \(exit code 0\)")()
        assert not Path(f"/proc/{pid}").exists()  # reaped by the main process: no zombie left behind
    finally:
        proc.kill()
        proc.wait()


def test_worker_never_imports_torch() -> None:
    code = "import sys, gatecast.service.forecast_worker; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_workers_batch_metrics_reach_the_main_process(pair: tuple[RunningServer, RunningServer]) -> None:
    """The worker's queue wait, run time, batch size and rows land in the main process's per-version series
    (sent twice a second, added in one pass per series): one queue wait and one batch item per series."""
    pooled, _ = pair
    labels = {"model": "taylor", "version": "1"}

    def sample(name: str) -> float:
        return pooled.app.metrics.registry.get_sample_value(name, labels) or 0.0

    names = [
        "gatecast_queue_wait_seconds_count",
        "gatecast_batch_size_sum",
        "gatecast_model_run_seconds_count",
        "gatecast_batch_rows_sum",
    ]
    before = {n: sample(n) for n in names}
    sent = path_count(pooled, "worker")
    window = taylor_values()[:64]  # chunk_rows (LIMITS): each series runs in one piece
    requests = [request("taylor", window), request("taylor", window, window, window)] * 3  # 12 series
    for data in requests:
        assert call(pooled, data)[0] == "OK"
    assert path_count(pooled, "worker") == sent + len(requests)
    wait_for(lambda: sample("gatecast_queue_wait_seconds_count") >= before["gatecast_queue_wait_seconds_count"] + 12)
    assert sample("gatecast_queue_wait_seconds_count") == before["gatecast_queue_wait_seconds_count"] + 12
    assert sample("gatecast_batch_size_sum") == before["gatecast_batch_size_sum"] + 12
    assert sample("gatecast_batch_rows_sum") == before["gatecast_batch_rows_sum"] + 12 * 64
    assert sample("gatecast_model_run_seconds_count") >= before["gatecast_model_run_seconds_count"] + 1


def batches(srv: RunningServer, model: str) -> float:
    value = srv.app.metrics.registry.get_sample_value("gatecast_batch_size_count", {"model": model, "version": "1"})
    return value or 0.0


def test_requests_run_together_in_the_worker_answer_the_same_bytes(pair: tuple[RunningServer, RunningServer]) -> None:
    """Many requests at once (single and multi-series, different lengths, a quantile model, a long one run in
    chunks by the batcher beside the small ones run whole): each answer is the bytes of the same request
    answered alone without workers, and the worker's batches are counted in the main process's metrics."""
    pooled, plain = pair
    values = taylor_values()
    small = [request("taylor", values[k : k + 20 + k % 5]) for k in range(12)]
    small += [request("taylor", values[:30], values[5:64], values[9:10]), request("tiny_lstm", values[:48])]
    small += [
        request("qsum", np.arange(k + 1, dtype=np.float32)[:, None], np.ones((4, 1), np.float32)) for k in range(3)
    ]
    long = request("taylor", values[:300], values[40:60])  # 300 rows: chunked (chunk_rows 64)
    want = {data: call(plain, data) for data in [*small, long]}
    assert all(a[0] == "OK" for a in want.values())
    taken = batches(pooled, "taylor")
    before = path_count(pooled, "worker")
    for _ in range(3):
        # 4 in flight: the worker holds 3 (max_queue_size), the main process's queue the rest; more in flight
        # could find both full and be refused RESOURCE_EXHAUSTED, as they should be, on a slow machine
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda d: (d, call(pooled, d)), [long, *small]))
        bad = [(answer[0], str(answer[1])[:200], want[data][0]) for data, answer in got if answer != want[data]]
        assert not bad, bad
    assert path_count(pooled, "worker") > before  # the worker took some (at most 3 at a time: max_queue_size)
    wait_for(lambda: batches(pooled, "taylor") > taken)  # forwarded about twice a second


def test_the_workers_reading_of_a_request_is_protobufs(repo: Path) -> None:
    """forecast_series reads what forecast_inputs reads, or declines (None) so that protobuf decides; the
    answer written directly is protobuf's bytes, for point and quantile models."""
    manifest = Manifest.read(repo / "taylor" / "1")
    settings = Settings(repo=repo, max_series=3, max_rows=50)

    class Limits:
        def check_request_rows(self, rows: int) -> None:
            if rows > 60:
                raise ValueError(rows)

    def inputs(data: bytes) -> list[np.ndarray] | None:
        try:
            return forecast_inputs(pb.ForecastRequest.FromString(data), manifest, Limits(), settings)  # type: ignore[arg-type]
        except Exception:
            return None

    x = np.arange(1, 13, dtype=np.float32)[:, None]
    nan = x.copy()
    nan[3] = np.nan
    m = matrix(x)
    swapped = pb.Matrix(rows=12, cols=1).SerializeToString() + b"".join(
        f.SerializeToString() for f in [pb.Matrix(values=m.values)]
    )
    cases = {
        "one": request("taylor", x),
        "three": request("taylor", x, x[:5], x[3:4], version=1),
        "fields reversed": pb.Matrix(values=m.values).SerializeToString(),  # not a request: series fields at top
        "no series": pb.ForecastRequest(model="taylor").SerializeToString(),
        "too many series": request("taylor", x, x, x, x),
        "too many rows": request("taylor", np.ones((51, 1), np.float32)),
        "too many rows in all": request("taylor", np.ones((50, 1), np.float32), x),
        "wrong columns": request("taylor", np.ones((3, 2), np.float32)),
        "nan": request("taylor", nan),
        "values short": pb.ForecastRequest(series=[pb.Matrix(rows=3, cols=1, values=[1, 2])]).SerializeToString(),
        "values then rows": b"\x1a" + bytes([len(swapped)]) + swapped,
        "rows twice": b"\x1a\x0a\x08\x01\x08\x01\x10\x01\x1a\x04" + np.float32(2).tobytes(),
        "unpacked value": b"\x1a\x09\x08\x01\x10\x01\x1d" + np.float32(2).tobytes(),
        "cut short": request("taylor", x)[:-3],
        "a copy of the name not UTF-8": b"\x0a\x01\xff" + request("taylor", x),
    }
    for name, data in cases.items():
        fast = forecast_series(data, 1, 3, 50, 60)
        slow = inputs(data)
        if fast is None:
            assert name not in ("one", "three", "values then rows"), name
        else:
            assert slow is not None and len(fast) == len(slow), name
            for a, b in zip(fast, slow, strict=True):
                assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes(), name
        refused = ("no series", "too many series", "too many rows", "too many rows in all", "wrong columns", "nan")
        if name in (*refused, "a copy of the name not UTF-8"):
            assert fast is None and slow is None, name  # refused by forecast_inputs or protobuf, with their words
    assert forecast_head(b"\x0a\x01\xff" + request("taylor", x)) is None  # the main process decodes it, and refuses
    rng = np.random.default_rng(1)
    quantile = Manifest.read(repo / "qsum" / "1")
    for man, q in ((manifest, None), (quantile, 3)):
        outs = [
            Output(
                rng.normal(size=(man.horizon, 1)).astype(np.float32),
                None if q is None else rng.normal(size=(man.horizon, 1, q)).astype(np.float32),
            )
            for _ in range(3)
        ]
        outs[0].y[0, 0] = -0.0
        for n in (1, 3):
            assert forecast_response_bytes(man, outs[:n]) == forecast_response(man, outs[:n]).SerializeToString()


def test_a_run_that_raises_answers_internal_and_the_worker_serves_on(pair: tuple[RunningServer, RunningServer]) -> None:
    """A model run that fails (onnxruntime raises) fails the requests it held, INTERNAL without its text as
    in the main process; requests in other runs are answered, and the worker serves on."""
    pooled, plain = pair
    good = request("fails", np.ones((5, 1), np.float32))
    bad = request("fails", np.array([[1.0], [-2.0], [3.0]], np.float32))
    want = call(plain, good)
    assert want[0] == "OK"
    code, details = call(plain, bad)
    assert code == "INTERNAL" and details.startswith("internal error (request id ")
    before = path_count(pooled, "worker")
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        answers = list(ex.map(lambda d: call(pooled, d), [bad, good, bad]))
    assert answers[1] == want
    for code, details in (answers[0], answers[2]):
        assert code == "INTERNAL" and re.fullmatch(r"internal error \(request id [0-9a-f]{12}\)", details)
    assert path_count(pooled, "worker") == before + 3
    assert call(pooled, good) == want and path_count(pooled, "worker") == before + 4


class WorkerProcess:
    """A forecast worker driven over its socket by the test, frame by frame, as the main process drives it."""

    def __init__(self, repo: Path, **settings: Any) -> None:
        from gatecast.service.forecast_pool import HEAD, HELLO, worker_env

        self.head = HEAD
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gatecast.service.forecast_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=worker_env(),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # its log, read once it has exited (a few lines)
            text=True,
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(60)
        self.buf = b""
        self.send(HELLO, 0, 0, server_settings(repo, **settings).model_dump_json().encode())

    def send(self, kind: int, ident: int, arg: int, payload: bytes = b"", deadline: float = -1.0) -> None:
        self.sock.sendall(self.frame(kind, ident, arg, payload, deadline))

    def frame(self, kind: int, ident: int, arg: int, payload: bytes = b"", deadline: float = -1.0) -> bytes:
        return self.head.pack(kind, ident, arg, deadline, len(payload)) + payload

    def read(self) -> tuple[int, int, int, bytes]:
        """The next frame: kind, id, arg, payload."""
        while True:
            if len(self.buf) >= self.head.size:
                kind, ident, arg, _, n = self.head.unpack_from(self.buf)
                if len(self.buf) >= self.head.size + n:
                    payload = self.buf[self.head.size : self.head.size + n]
                    self.buf = self.buf[self.head.size + n :]
                    return kind, ident, arg, payload
            data = self.sock.recv(1 << 16)
            assert data, "the worker closed its output"
            self.buf += data

    def close(self) -> int:
        self.sock.shutdown(socket.SHUT_WR)
        code = self.proc.wait(60)
        self.sock.close()
        return code


def test_the_worker_drops_what_is_past_its_deadline_or_cancelled_and_forwards_its_batches(repo: Path) -> None:
    """Driven frame by frame: a request whose deadline has passed when its turn comes is answered
    DEADLINE_EXCEEDED with the batcher's words (run whole or in chunks); one cancelled in the same read is not
    run, and its cancel is acknowledged (CANCELLED: every request sent gets exactly one answer frame, which the
    main process's stall watchdog counts on); the others are answered with the in-process bytes, their batches
    are forwarded (one series per run here, counted once each), and the end of the input ends the worker with
    exit code 0."""

    from gatecast.service.forecast_pool import ANSWER, BATCHES, CANCEL, FORECAST, LOAD, LOADED

    settings = {"forecast_workers": 1, **LIMITS}
    plain = RunningServer(server_settings(repo, forecast_workers=0, **LIMITS))
    worker = WorkerProcess(repo, **settings)
    try:
        manifest = Manifest.read(repo / "taylor" / "1")
        spec = {"folder": str(repo / "taylor" / "1"), "manifest": manifest.model_dump_json()}
        worker.send(LOAD, 0, 7, json.dumps(spec).encode())
        assert worker.read() == (LOADED, 1, 7, b"")
        series = taylor_values()
        small, long = request("taylor", series[:40]), request("taylor", series[:200])  # 200 rows: chunked
        past = time.monotonic() - 1.0
        frames = [
            worker.frame(FORECAST, 1, 7, small, past),
            worker.frame(FORECAST, 2, 7, long, past),
            worker.frame(FORECAST, 3, 7, small),
            worker.frame(CANCEL, 3, 0),
            worker.frame(FORECAST, 4, 7, small, time.monotonic() + 60),
        ]
        worker.sock.sendall(b"".join(frames))  # one read for the worker
        answers: dict[int, tuple[int, bytes]] = {}
        batch_sizes: list[float] = []

        def read_until(done: Callable[[], bool]) -> None:
            while not done():
                kind, ident, arg, payload = worker.read()
                if kind == ANSWER:
                    assert ident not in answers
                    answers[ident] = (arg, payload)
                elif kind == BATCHES:
                    counts = np.frombuffer(payload, "<u4", 5).tolist()
                    values = np.frombuffer(payload, "<f8", offset=20).tolist()
                    assert arg == 7 and counts[0] == counts[2] == counts[3]  # one series per run here
                    batch_sizes.extend(values[counts[0] + counts[1] : counts[0] + counts[1] + counts[2]])

        read_until(lambda: len(answers) == 4)
        words = b"the deadline passed while the request was queued"
        deadline = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answers[1] == (deadline, words) and answers[2] == (deadline, words)
        assert answers[4] == (0, call(plain, small)[1])
        cancelled = (grpc.StatusCode.CANCELLED.value[0], b"cancelled")
        assert answers[3] == cancelled  # cancelled before it ran: acknowledged, not run
        worker.send(FORECAST, 5, 7, small)
        read_until(lambda: 5 in answers and len(batch_sizes) == 2)  # forwarded about twice a second
        assert answers[5] == (0, call(plain, small)[1])
        assert batch_sizes == [1.0, 1.0]  # id 4, then id 5: each ran alone
        # a chunked request of two series, past its deadline and cancelled in the same read: its series fail
        # and its call has gone; only the cancel is answered, and nothing is left for asyncio to log as unread
        worker.sock.sendall(
            worker.frame(FORECAST, 6, 7, request("taylor", series[:200], series[:200]), past)
            + worker.frame(CANCEL, 6, 0)
        )
        worker.send(FORECAST, 7, 7, small)
        read_until(lambda: 7 in answers)
        assert answers[6] == cancelled
        assert worker.close() == 0
        assert worker.proc.stderr is not None
        log = worker.proc.stderr.read()
        assert "never retrieved" not in log and "Traceback" not in log, log
    finally:
        worker.proc.kill()
        plain.stop()


def test_a_worker_refuses_a_manifest_changed_since_the_main_process_loaded_it(repo: Path) -> None:
    """Found by a hostile operator: a worker (re)started after the manifest was edited in place (quantile
    levels changed, the graph the same) served the edited one from disk, so Forecast answered with other quantiles
    than GetModel listed, and KServe failed INTERNAL. A worker now serves a version only with the manifest
    the main process sent; otherwise its Forecasts stay in the main process."""
    from gatecast.service.forecast_pool import LOAD, LOADED

    worker = WorkerProcess(repo, forecast_workers=1, **LIMITS)
    try:
        folder = repo / "taylor" / "1"
        served = Manifest.read(folder)
        # what the main process loaded before the file was edited: another scaling of the values
        edited = served.model_copy(update={"scaler": served.scaler.model_copy(update={"mean": [1.0]})})
        worker.send(LOAD, 0, 3, json.dumps({"folder": str(folder), "manifest": edited.model_dump_json()}).encode())
        kind, ok, key, error = worker.read()
        assert (kind, ok, key) == (LOADED, 0, 3)
        assert "differs from the one the main process serves" in error.decode() and "scaler" in error.decode()
        worker.send(LOAD, 0, 4, json.dumps({"folder": str(folder), "manifest": served.model_dump_json()}).encode())
        assert worker.read() == (LOADED, 1, 4, b"")
        # found in review of that check: a score of infinity or NaN (serialised as null, and NaN != NaN) made
        # every worker refuse an unchanged manifest
        odd = repo / "odd" / "1"
        shutil.copytree(folder, odd)
        raw = json.loads((odd / "manifest.json").read_text())
        raw["name"] = "odd"
        raw["evaluation"]["scores"]["model"]["mase"] = float("inf")
        raw["training"]["best_val_loss"] = float("nan")
        (odd / "manifest.json").write_text(json.dumps(raw))  # Python writes Infinity and NaN, and reads them
        loaded = Manifest.read(odd)  # what the main process holds
        worker.send(LOAD, 0, 5, json.dumps({"folder": str(odd), "manifest": loaded.model_dump_json()}).encode())
        assert worker.read() == (LOADED, 1, 5, b"")
        assert worker.close() == 0
    finally:
        worker.proc.kill()


def test_the_workers_own_line_is_bounded_as_the_batchers_queue(repo: Path) -> None:
    """Requests held on the worker's lean path count against max_queue_size with the batcher's: with room
    for one, the second request of a read is refused RESOURCE_EXHAUSTED in the batcher's words, and counted."""
    from gatecast.service.forecast_pool import ANSWER, BATCHES, FORECAST, LOAD, LOADED

    worker = WorkerProcess(repo, forecast_workers=1, max_queue_size=1, **LIMITS)
    try:
        manifest = Manifest.read(repo / "taylor" / "1")
        spec = {"folder": str(repo / "taylor" / "1"), "manifest": manifest.model_dump_json()}
        worker.send(LOAD, 0, 7, json.dumps(spec).encode())
        assert worker.read() == (LOADED, 1, 7, b"")
        small = request("taylor", taylor_values()[:40])
        worker.sock.sendall(worker.frame(FORECAST, 1, 7, small) + worker.frame(FORECAST, 2, 7, small))  # one read
        answers: dict[int, tuple[int, bytes]] = {}
        rejected = 0
        while len(answers) < 2 or not rejected:
            kind, ident, arg, payload = worker.read()
            if kind == ANSWER:
                answers[ident] = (arg, payload)
            elif kind == BATCHES:
                rejected += int(np.frombuffer(payload, "<u4", 5)[4])
        assert answers[1][0] == 0
        assert answers[2][0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert answers[2][1].startswith(b"batch queue full for taylor v1 (40 rows of 1 request(s) waiting; bounds ")
        assert rejected == 1
        assert worker.close() == 0
    finally:
        worker.proc.kill()


def infer(srv: RunningServer, x: np.ndarray, model: str = "taylor", timeout: float | None = 30) -> Answer:
    """A KServe ModelInfer of windows x [batch, time, features]: ("OK", the answer's bytes) or the status."""
    from gatecast.inference import grpc_predict_v2_pb2 as kpb

    name = srv.app.repo.resolve(model, 0).runtime.manifest.onnx.input
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(x.shape))
    req = kpb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.astype("<f4").tobytes()])
    with grpc.insecure_channel(srv.address) as ch:
        try:
            return "OK", ch.unary_unary(INFER)(req.SerializeToString(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name, e.details()


def test_kserve_infer_runs_in_the_worker_and_answers_the_same_bytes(pair: tuple[RunningServer, RunningServer]) -> None:
    """ModelInfer is a Forecast in tensor form: with a worker up it runs there, answered byte for byte as in
    the main process (the same forecasts, quantiles, output order and shapes)."""
    pooled, plain = pair
    values = taylor_values()
    cases = [
        ("taylor", np.stack([values[:432], values[500:932], values[7:439]])),
        ("taylor", values[:300][None]),  # longer than chunk_rows (64): the worker's batcher, in pieces
        ("tiny_lstm", np.stack([values[:48], values[48:96]])),
        ("qsum", np.stack([np.arange(12, dtype=np.float32)[:, None], np.ones((12, 1), np.float32)])),  # quantiles
    ]
    worker, here = path_count(pooled, "worker"), path_count(plain, "process")
    for model, x in cases:
        got, want = infer(pooled, x, model), infer(plain, x, model)
        assert got[0] == "OK" and got == want, model
    assert path_count(pooled, "worker") == worker + len(cases)
    assert path_count(plain, "process") == here + len(cases)


def test_kserve_infer_in_the_worker_keeps_deadlines_and_failed_runs(pair: tuple[RunningServer, RunningServer]) -> None:
    pooled, plain = pair
    bad = np.array([[[1.0], [-2.0], [3.0]]], np.float32)  # the failing model's run raises for it
    for srv in pair:
        code, details = infer(srv, bad, "fails")
        assert code == "INTERNAL" and re.fullmatch(r"internal error \(request id [0-9a-f]{12}\)", details)
    x = taylor_values()[:432][None]
    pid = worker_pid(pooled)
    os.kill(pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            late = ex.submit(infer, pooled, x, "taylor", 0.5)  # its deadline passes while the worker holds it
            wait_for(lambda: pending(pooled) == 1)
            assert late.result(timeout=30)[0] == "DEADLINE_EXCEEDED"
            wait_for(lambda: pending(pooled) == 0)  # the call let go of it while the worker is still stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    before = path_count(pooled, "worker")
    assert infer(pooled, x) == infer(plain, x)
    assert path_count(pooled, "worker") == before + 1


def test_workers_run_in_a_process_group_of_their_own(pair: tuple[RunningServer, RunningServer]) -> None:
    """A Ctrl-C (SIGINT to the terminal's foreground process group) must reach the main process only: a worker
    still importing would die of it; the main process drains and then closes the workers' sockets."""
    pooled, _ = pair
    pid = worker_pid(pooled)
    assert os.getpgid(pid) == pid != os.getpgid(0)
    # a background job of the terminal it logs to: SIGTTOU ignored, or `stty tostop` would stop it at its first line
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTOU):
        assert ignored & (1 << (sig - 1)), sig


def test_kserves_hand_over_writes_and_reads_what_protobuf_does(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ModelInfer's windows become a ForecastRequest's bytes as one array, not one piece per window, and a
    worker's answer is read at known offsets (a 4,096-window request held the event loop for 67 ms when each
    window was written and read by itself); both equal protobuf's, and any other layout of an answer is
    decoded by protobuf."""
    from gatecast.service.oneshot import forecast_arrays, forecast_request_bytes, forecast_response_bytes

    rng = np.random.default_rng(0)
    for batch, rows, features in [(1, 1, 1), (3, 432, 1), (5, 7, 3), (200, 2, 2)]:
        x = rng.standard_normal((batch, rows, features)).astype(np.float32)
        for model, version in [("taylor", 0), ("m", 3), ("", 0), ("x" * 64, 300)]:
            want = pb.ForecastRequest(model=model, version=version, series=[matrix(w) for w in x])
            assert forecast_request_bytes(model, version, x) == want.SerializeToString()
    for name in ("taylor", "qsum", "tiny_lstm"):
        m = Manifest.read(max((p for p in (repo / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)))
        n, h, t = 4, m.horizon, m.n_targets
        y = rng.standard_normal((n, h, t)).astype(np.float32)
        q = rng.standard_normal((n, h, t, len(m.quantiles))).astype(np.float32) if m.onnx.quantile_output else None
        outs = [Output(y[i], None if q is None else q[i]) for i in range(n)]
        data = forecast_response_bytes(m, outs)
        for answer in (data, data + b"\x30\x01"):  # the second with an unknown field: decoded by protobuf
            got_y, got_q = forecast_arrays(answer, m, n)
            np.testing.assert_array_equal(got_y, y)
            assert got_y.dtype == np.float32 and got_y.shape == (n, h, t)
            if q is None:
                assert got_q is None
            else:
                assert got_q is not None
                np.testing.assert_array_equal(got_q, q)
        with monkeypatch.context() as patch:  # the worker's own layout is read without protobuf
            from gatecast.service import oneshot

            patch.setattr(oneshot.pb.ForecastResponse, "FromString", None)
            np.testing.assert_array_equal(forecast_arrays(data, m, n)[0], y)
            with pytest.raises(TypeError):
                forecast_arrays(data + b"\x30\x01", m, n)
