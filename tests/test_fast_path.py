"""The single-message fast path (issue 9): matrices converted as blocks of bytes must give exactly what the
element-by-element conversion gave, through the real server too; the start-up heap is frozen; the
throughput benchmark's smoke run works."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gatecast.manifest import Manifest
from gatecast.service.convert import to_array, to_matrix, to_quantile_matrix
from gatecast.service.errors import InvalidArgument
from gatecast.service.server import GC_YOUNG
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

from .conftest import DEFAULT_MODEL, ROOT, RunningServer, array, matrix, server_settings, taylor_values
from .test_reliability_batcher import SumRuntime, started_batcher


def _unpacked(rows: int, cols: int, values: np.ndarray) -> bytes:
    """A Matrix as an older or hand-written client may send it: each float its own field 3 (not packed)."""
    out = bytes([0x08, rows, 0x10, cols])
    return out + b"".join(b"\x1d" + np.float32(v).tobytes() for v in values.ravel())


@pytest.mark.parametrize("shape", [(1, 1), (96, 1), (5, 3), (200, 7), (300, 1)])
def test_values_read_as_a_block_are_exact(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 1e5).astype(np.float32)
    x[0, 0] = np.float32(3.4e38)  # the largest floats and the smallest survive the trip bit for bit
    x[-1, -1] = np.float32(1e-45)
    m = matrix(x)
    got = to_array(m, shape[1], "series[0]", 10**6)
    assert got.dtype == np.float32 and got.shape == shape
    assert got.tobytes() == np.array(m.values, dtype=np.float32).reshape(shape).tobytes()


def test_other_layouts_take_the_slow_path_with_the_same_result() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2) + 0.25
    unknown = pb.Matrix.FromString(matrix(x).SerializeToString() + b"\x20\x05")  # an unknown field 4 after the values
    unpacked = pb.Matrix.FromString(_unpacked(3, 2, x))
    for m in (unknown, unpacked):
        assert to_array(m, 2, "rows", 100).tobytes() == x.tobytes()


def test_bad_matrices_are_still_refused() -> None:
    x = np.ones((4, 1), np.float32)
    x[2, 0] = np.inf
    with pytest.raises(InvalidArgument, match="row 2 holds NaN or infinity"):
        to_array(matrix(x), 1, "rows", 100)
    with pytest.raises(InvalidArgument, match="3 values for a 2 x 2 matrix"):
        to_array(pb.Matrix(rows=2, cols=2, values=[1, 2, 3]), 2, "rows", 100)


def test_answers_built_as_a_block_equal_the_element_wise_ones() -> None:
    rng = np.random.default_rng(1)
    y = rng.standard_normal((24, 3)).astype(np.float32)
    assert to_matrix(y) == pb.Matrix(rows=24, cols=3, values=y.ravel().tolist())
    q = rng.standard_normal((24, 2, 3)).astype(np.float32)
    assert to_quantile_matrix(q) == pb.Matrix(rows=24, cols=6, values=q.ravel().tolist())
    assert to_matrix(y[:, :1].astype(np.float64)) == pb.Matrix(rows=24, cols=1, values=y[:, 0].tolist())


@dataclass
class GatedRuntime(SumRuntime):
    """The first run waits until the test opens the gate, so that requests pile up behind it."""

    gate: threading.Event = field(default_factory=threading.Event)
    started: int = 0

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], None]:
        self.started += 1
        if self.started == 1:
            self.gate.wait(10)
        return super().run(x, states)


def test_without_a_queue_delay_a_lone_request_runs_at_once_and_what_waits_runs_together() -> None:
    async def scenario() -> None:
        limits = SimpleNamespace(max_batch_rows=2048, chunk_rows=512, max_queue_rows=100_000, max_request_rows=5_000)
        rt = GatedRuntime(limits)
        batcher, _ = started_batcher(rt, 64)
        first = batcher.submit(np.ones((3, 1), np.float32))
        for _ in range(100):  # the lone request is taken without waiting for company
            if rt.started:
                break
            await asyncio.sleep(0.01)
        assert rt.started == 1
        rest = [batcher.submit(np.full((3, 1), k, np.float32)) for k in range(5)]
        await asyncio.sleep(0.05)
        rt.gate.set()
        assert (await first).y.ravel().tolist() == [3.0]
        assert [(await f).y.ravel().tolist() for f in rest] == [[3.0 * k] for k in range(5)]
        assert rt.runs == [(1, 3), (5, 3)]  # the five that arrived during the run made one batch
        await batcher.close()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def taylor_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("fast-path")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    return repo


@pytest.fixture(scope="module")
def server(taylor_repo: Path) -> Iterator[RunningServer]:
    srv = RunningServer(server_settings(taylor_repo))
    yield srv
    srv.stop()


def test_forecast_is_the_graph_output_bit_for_bit(server: RunningServer, taylor_repo: Path) -> None:
    folder = taylor_repo / "taylor" / "1"
    m = Manifest.read(folder)
    window = taylor_values()[100 : 100 + m.context_length]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / m.onnx.file), opts, providers=["CPUExecutionProvider"])
    feed = {m.onnx.input: window[None]}
    feed.update({s.input: np.zeros((s.dims[0], 1, s.dims[1]), np.float32) for s in m.states})
    (expected,) = session.run([m.onnx.output], feed)
    with grpc.insecure_channel(server.address) as ch:
        got = pb_grpc.ForecasterStub(ch).Forecast(pb.ForecastRequest(model="taylor", series=[matrix(window)]))
    assert array(got.forecasts[0]).tobytes() == expected[0].tobytes()


def test_unpacked_observations_step_a_session_like_packed_ones(server: RunningServer) -> None:
    values = taylor_values()
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        observe_raw = ch.unary_unary(
            "/gatecast.v1.Forecaster/Observe", response_deserializer=pb.ObserveResponse.FromString
        )
        history = matrix(values[:432])
        packed, raw = (stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history)) for _ in range(2))
        for seq in (1, 2, 3):
            rows = values[432 + 2 * seq : 434 + 2 * seq]
            a = stub.Observe(pb.ObserveRequest(session_id=packed.session_id, sequence=seq, rows=matrix(rows)))
            head = pb.ObserveRequest(session_id=raw.session_id, sequence=seq).SerializeToString()
            body = _unpacked(2, 1, rows)
            b = observe_raw(head + b"\x1a" + bytes([len(body)]) + body)
            assert array(a.forecast).tobytes() == array(b.forecast).tobytes()


def test_start_up_heap_is_frozen_and_young_collections_are_rarer(server: RunningServer) -> None:
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == GC_YOUNG


def test_throughput_benchmark_quick_run(tmp_path: Path, taylor_repo: Path) -> None:
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--quick", "--servers", "echo", "gatecast"]
    cmd += ["--repo", str(taylor_repo), "--model", "taylor", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["servers"]) == {"echo", "gatecast"}
    assert result["payload_bytes"]["forecast_answer"] > 48 * 4  # 48 floats and the model's name
    for name, s in result["servers"].items():
        assert s["unary"] and all(r["per_s"] > 0 and r["errors"] == 0 for r in s["unary"]), name
        assert s["stream"]["per_s"] > 0 and s["stream"]["errors"] == 0, name
        assert s["unary"][0]["of_echo"] > 0 and s["stream"]["of_echo"] > 0
    assert re.search(r"^\s+gatecast\s+\d+\s+\d+", done.stdout, re.M), done.stdout  # a gatecast row with figures
