"""The real server on loopback, a real gRPC client: answers, sessions, streams, batching, errors."""

from __future__ import annotations

import concurrent.futures
import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gatecast.graph import zero_states
from gatecast.manifest import Manifest
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, taylor_values

RTOL = 1e-5


def reference(folder: Path, histories: list[np.ndarray]) -> list[np.ndarray]:
    """In-process onnxruntime on the same file, each series alone from a zero state."""
    m = Manifest.read(folder)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for x in histories:
        feed = {"x": x[None].astype(np.float32)}
        feed.update(zero_states(m.states, 1))
        out.append(sess.run(["y"], feed)[0][0])
    return out


def metric(server: RunningServer, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("model", ["taylor", "tiny_lstm"])
def test_forecast_equals_in_process_onnxruntime(stub: pb_grpc.ForecasterStub, model_repo: Path, model: str) -> None:
    values = taylor_values()
    folder = sorted((model_repo / model).iterdir())[0]
    m = Manifest.read(folder)
    lengths = [m.context_length, 1, 7, m.context_length, 500]
    histories = [values[100 + 3 * i : 100 + 3 * i + n] for i, n in enumerate(lengths)]
    reply = stub.Forecast(pb.ForecastRequest(model=model, series=[matrix(h) for h in histories]))
    assert (reply.model, reply.version) == (model, m.version)
    assert len(reply.forecasts) == len(histories)
    for got, want in zip(reply.forecasts, reference(folder, histories), strict=True):
        assert (got.rows, got.cols) == (m.horizon, m.n_targets)
        np.testing.assert_allclose(array(got), want, rtol=RTOL)


def test_session_one_row_at_a_time_equals_one_forecast(stub: pb_grpc.ForecasterStub, server: RunningServer) -> None:
    history = taylor_values()[1000:1400]
    whole = array(stub.Forecast(pb.ForecastRequest(model="tiny_lstm", series=[matrix(history)])).forecasts[0])
    opened = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm"))
    assert re.fullmatch(r"[0-9a-f]{32}", opened.session_id) and opened.next_sequence == 1
    assert not opened.HasField("forecast")
    for seq, row in enumerate(history, start=1):
        reply = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=seq, rows=matrix(row[None])))
        assert reply.sequence == seq
    np.testing.assert_allclose(array(reply.forecast), whole, rtol=RTOL)
    # a retry of the last step answers the same without applying it twice
    again = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=seq, rows=matrix(history[-1:])))
    np.testing.assert_array_equal(array(again.forecast), array(reply.forecast))
    closed = stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))
    assert closed.steps == len(history)


def test_open_with_history_then_observe_chunks(stub: pb_grpc.ForecasterStub) -> None:
    values = taylor_values()[2000:2300]
    opened = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:200])))
    first = array(stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:200])])).forecasts[0])
    np.testing.assert_allclose(array(opened.forecast), first, rtol=RTOL)
    reply = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=1, rows=matrix(values[200:260])))
    reply = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=2, rows=matrix(values[260:])))
    whole = array(stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values)])).forecasts[0])
    np.testing.assert_allclose(array(reply.forecast), whole, rtol=RTOL)


def test_stream_many_sessions_and_reconnect(server: RunningServer) -> None:
    values = taylor_values()
    n_sessions, n_rows = 6, 120
    histories = [values[500 + 37 * k : 500 + 37 * k + n_rows] for k in range(n_sessions)]
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        ids = [stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")).session_id for _ in range(n_sessions)]
        expected = [
            array(f)
            for f in stub.Forecast(
                pb.ForecastRequest(model="tiny_lstm", series=[matrix(h) for h in histories])
            ).forecasts
        ]

    def messages(start: int, stop: int):  # type: ignore[no-untyped-def]
        for t in range(start, stop):  # interleave the sessions on one stream
            for sid, h in zip(ids, histories, strict=True):
                yield pb.ObserveRequest(session_id=sid, sequence=t + 1, rows=matrix(h[t : t + 1]))

    last: dict[str, pb.StreamResponse] = {}
    seen: dict[str, list[int]] = {sid: [] for sid in ids}
    for start, stop in ((0, 50), (50, n_rows)):  # a reconnect between the halves: a new channel
        with grpc.insecure_channel(server.address) as ch:
            for r in pb_grpc.ForecasterStub(ch).Stream(messages(start, stop)):
                assert r.WhichOneof("result") == "forecast", r.error.message
                seen[r.session_id].append(r.sequence)
                last[r.session_id] = r
    for sid, want in zip(ids, expected, strict=True):
        assert seen[sid] == list(range(1, n_rows + 1))  # each session answered in order
        np.testing.assert_allclose(array(last[sid].forecast), want, rtol=RTOL)


def test_stream_errors_stay_on_their_message(stub: pb_grpc.ForecasterStub) -> None:
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
    row = matrix(np.array([[30000.0]]))
    replies = list(
        stub.Stream(
            iter(
                [
                    pb.ObserveRequest(session_id=sid, sequence=1, rows=row),
                    pb.ObserveRequest(session_id=sid, sequence=5, rows=row),
                    pb.ObserveRequest(session_id="0" * 32, sequence=1, rows=row),
                    pb.ObserveRequest(session_id=sid, sequence=2, rows=row),
                ]
            )
        )
    )
    by_seq = {(r.session_id, r.sequence): r for r in replies}
    assert by_seq[(sid, 1)].WhichOneof("result") == "forecast"
    gap = by_seq[(sid, 5)].error
    assert gap.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "expected 2" in gap.message
    assert by_seq[("0" * 32, 1)].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_seq[(sid, 2)].WhichOneof("result") == "forecast"


def test_64_concurrent_clients_are_batched_and_right(server: RunningServer, model_repo: Path) -> None:
    values = taylor_values()
    histories = [values[40 * i : 40 * i + 336] for i in range(64)]
    want = reference(model_repo / "taylor" / "1", histories)
    before = metric(server, "gatecast_batch_size_bucket", model="taylor", le="1.0")
    count_before = metric(server, "gatecast_batch_size_count", model="taylor")
    channels = [grpc.insecure_channel(server.address) for _ in range(64)]
    try:

        def ask(i: int) -> np.ndarray:
            stub = pb_grpc.ForecasterStub(channels[i])
            out = None
            for _ in range(5):
                out = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(histories[i])]), timeout=30)
            assert out is not None
            return array(out.forecasts[0])

        with concurrent.futures.ThreadPoolExecutor(64) as ex:
            got = list(ex.map(ask, range(64)))
    finally:
        for ch in channels:
            ch.close()
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL)
    singles = metric(server, "gatecast_batch_size_bucket", model="taylor", le="1.0") - before
    batches = metric(server, "gatecast_batch_size_count", model="taylor") - count_before
    assert batches < 64 * 5, "every request ran alone: nothing was batched"
    assert batches - singles > 0, "no batch held more than one item"


def test_model_info_health_reflection_and_metrics(stub: pb_grpc.ForecasterStub, server: RunningServer) -> None:
    listed = stub.ListModels(pb.ListModelsRequest())
    assert {(m.name, m.version) for m in listed.models} >= {("taylor", 1), ("tiny_lstm", 1)}
    info = stub.GetModel(pb.GetModelRequest(name="tiny_lstm"))
    assert (info.cell, info.layers, info.hidden_size, info.horizon, info.context_length) == ("lstm", 2, 8, 12, 48)
    assert info.provider == "CPUExecutionProvider" and info.is_default
    assert {s.forecaster for s in info.test_metrics} >= {"model", "naive", "seasonal_naive_48"}
    assert all(s.mae > 0 for s in info.test_metrics)
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="gatecast.v1.Forecaster"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "gatecast.v1.Forecaster" in {s.name for s in answer.list_services_response.service}
    assert metric(server, "gatecast_model_loaded", model="taylor", version="1", provider="CPUExecutionProvider") == 1
    assert metric(server, "gatecast_requests_total", rpc="GetModel", model="tiny_lstm", code="OK") >= 1
    assert metric(server, "gatecast_model_run_seconds_count", model="taylor") > 0
    assert metric(server, "gatecast_queue_wait_seconds_count", model="taylor") > 0
    assert metric(server, "gatecast_request_latency_seconds_count", rpc="GetModel") >= 1


def _code(call, *args) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code(), info.value.details()


def test_errors_name_what_was_expected(stub: pb_grpc.ForecasterStub, server: RunningServer) -> None:
    F, S = grpc.StatusCode, pb.ForecastRequest
    ok = matrix(np.ones((10, 1)) * 30000)
    cases = [
        (stub.Forecast, S(model="nope", series=[ok]), F.NOT_FOUND, "model 'nope' not found; loaded models:"),
        (stub.Forecast, S(model="taylor", version=9, series=[ok]), F.NOT_FOUND, "no version 9; loaded versions: [1]"),
        (stub.Forecast, S(model="taylor"), F.INVALID_ARGUMENT, "no series given"),
        (
            stub.Forecast,
            S(model="taylor", series=[matrix(np.ones((3, 2)))]),
            F.INVALID_ARGUMENT,
            "series[0]: 2 column(s); the model expects 1 feature(s)",
        ),
        (
            stub.Forecast,
            S(model="taylor", series=[pb.Matrix(rows=3, cols=1, values=[1.0])]),
            F.INVALID_ARGUMENT,
            "1 values for a 3 x 1 matrix; expected 3",
        ),
        (
            stub.Forecast,
            S(model="taylor", series=[ok, matrix(np.array([[1.0], [np.nan]]))]),
            F.INVALID_ARGUMENT,
            "series[1]: row 1 holds NaN or infinity",
        ),
        (stub.Forecast, S(model="taylor", series=[pb.Matrix(rows=0, cols=1)]), F.INVALID_ARGUMENT, "no rows"),
        (
            stub.Observe,
            pb.ObserveRequest(session_id="xyz", sequence=1, rows=ok),
            F.INVALID_ARGUMENT,
            "expected the 32 hex characters",
        ),
        (stub.Observe, pb.ObserveRequest(session_id="ab" * 16, sequence=1, rows=ok), F.NOT_FOUND, "not found"),
        (stub.CloseSession, pb.CloseSessionRequest(session_id="ab" * 16), F.NOT_FOUND, "not found"),
        (stub.GetModel, pb.GetModelRequest(name="nope"), F.NOT_FOUND, "model 'nope' not found"),
        (
            stub.OpenSession,
            pb.OpenSessionRequest(model="taylor", history=matrix(np.ones((2, 3)))),
            F.INVALID_ARGUMENT,
            "history: 3 column(s)",
        ),
    ]
    for call, request, code, text in cases:
        got_code, details = _code(call, request)
        assert got_code == code, (request, details)
        assert text in details, details
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
    got_code, details = _code(stub.Observe, pb.ObserveRequest(session_id=sid, sequence=2, rows=ok))
    assert got_code == F.FAILED_PRECONDITION and "expected 1" in details
    got_code, details = _code(stub.Observe, pb.ObserveRequest(session_id=sid, sequence=0, rows=ok))
    assert got_code == F.INVALID_ARGUMENT and "sequence must be set" in details
    stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=ok))
    got_code, details = _code(stub.Observe, pb.ObserveRequest(session_id=sid, sequence=3, rows=ok))
    assert got_code == F.FAILED_PRECONDITION and "expected 2 (or 1 to repeat the last step)" in details
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    got_code, _ = _code(stub.Observe, pb.ObserveRequest(session_id=sid, sequence=2, rows=ok))
    assert got_code == F.NOT_FOUND
    assert metric(server, "gatecast_requests_total", rpc="Forecast", code="INVALID_ARGUMENT") >= 5
    # names a client makes up never become label values: the metrics cannot be grown from outside
    assert metric(server, "gatecast_requests_total", model="nope") == 0
    assert metric(server, "gatecast_requests_total", rpc="Forecast", model="", code="NOT_FOUND") >= 1


def test_bad_input_does_not_touch_another_session(stub: pb_grpc.ForecasterStub) -> None:
    values = taylor_values()[3000:3100]
    a = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:90]))).session_id
    b = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
    for bad in (matrix(np.ones((1, 4))), matrix(np.array([[np.inf]]))):
        with pytest.raises(grpc.RpcError):
            stub.Observe(pb.ObserveRequest(session_id=b, sequence=1, rows=bad))
    reply = stub.Observe(pb.ObserveRequest(session_id=a, sequence=1, rows=matrix(values[90:])))
    whole = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values)])).forecasts[0]
    np.testing.assert_allclose(array(reply.forecast), array(whole), rtol=RTOL)


def test_pipelined_steps_of_one_session_apply_in_order(server: RunningServer) -> None:
    """Many messages for one session sent without waiting: each answer must be the forecast after exactly
    its own rows, so the steps applied one at a time and in arrival order."""
    values = taylor_values()[1500:1700]
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        a = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        b = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        msgs = []
        for t in range(len(values)):
            for sid in (a, b):
                msgs.append(pb.ObserveRequest(session_id=sid, sequence=t + 1, rows=matrix(values[t : t + 1])))
        replies = [r for r in stub.Stream(iter(msgs)) if r.session_id == a]
        assert [r.sequence for r in replies] == list(range(1, len(values) + 1))
        for t in (0, 9, 99, len(values) - 1):
            want = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[: t + 1])])).forecasts[0]
            np.testing.assert_allclose(array(replies[t].forecast), array(want), rtol=RTOL)
