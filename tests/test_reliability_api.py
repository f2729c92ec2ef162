"""Issue 7, API side, against the real server on loopback: streams and retries say what happened,
malformed messages get INVALID_ARGUMENT on every method, client strings are quoted short, and the
model card and quantile forecasts travel in the answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gatecast.manifest import Manifest
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, array, matrix, taylor_values
from tests.test_reliability_engine import RuntimeDouble, serve, taylor_repo, version

__all__ = ["taylor_repo"]  # the module fixture, shared

METHOD = "/gatecast.v1.Forecaster/"
ROW = matrix(np.array([[30000.0]]))


@pytest.fixture(scope="module")
def srv(taylor_repo: Path) -> Iterator[RunningServer]:
    with serve(taylor_repo, max_stream_inflight=8) as s:
        yield s


@pytest.fixture()
def stub(srv: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield pb_grpc.ForecasterStub(ch)


def _raw(b: bytes) -> bytes:
    return b


# --- malformed messages ----------------------------------------------------------------------------------

GARBAGE = [
    b"\xff\xff\xff\xff",  # a field tag that does not end
    b"\x0a\x05ab",  # a length-delimited field longer than the message
    b"\x0a\x02\xff\xfe",  # field 1 (a string) that is not UTF-8
]


@pytest.mark.parametrize("method", ["Forecast", "OpenSession", "Observe", "CloseSession", "GetModel", "ListModels"])
def test_malformed_protobuf_is_invalid_argument_on_every_unary_method(srv: RunningServer, method: str) -> None:
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.unary_unary(METHOD + method, request_serializer=_raw, response_deserializer=_raw)
        for data in GARBAGE[:2] if method == "ListModels" else GARBAGE:
            with pytest.raises(grpc.RpcError) as err:
                call(data, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, err.value.details())
            assert "is not a valid gatecast.v1." in err.value.details()


def test_an_undecodable_stream_message_is_answered_and_the_stream_goes_on(
    stub: pb_grpc.ForecasterStub, srv: RunningServer
) -> None:
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
    ch = grpc.insecure_channel(srv.address)
    stream = ch.stream_stream(
        METHOD + "Stream", request_serializer=_raw, response_deserializer=pb.StreamResponse.FromString
    )
    msgs = [
        pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW).SerializeToString(),
        b"\xff\xff\xff\xff",
        pb.ObserveRequest(session_id=sid, sequence=2, rows=ROW).SerializeToString(),
    ]
    replies = list(stream(iter(msgs), timeout=10))
    ch.close()
    assert len(replies) == 3
    bad = [r for r in replies if r.WhichOneof("result") == "error"]
    assert len(bad) == 1 and bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid gatecast.v1.ObserveRequest" in bad[0].error.message
    assert [r.sequence for r in replies if r.session_id == sid] == [1, 2]
    assert all(r.WhichOneof("result") == "forecast" for r in replies if r.session_id == sid)


def test_client_strings_are_quoted_short(stub: pb_grpc.ForecasterStub) -> None:
    long = "m" * 10_000
    for call, request in (
        (stub.Forecast, pb.ForecastRequest(model=long, series=[ROW])),
        (stub.GetModel, pb.GetModelRequest(name=long)),
        (stub.OpenSession, pb.OpenSessionRequest(model=long)),
        (stub.Observe, pb.ObserveRequest(session_id=long, sequence=1, rows=ROW)),
        (stub.CloseSession, pb.CloseSessionRequest(session_id=long)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        details = err.value.details()
        assert len(details) < 300 and "10000 characters" in details, details


# --- streams and retries say what happened ------------------------------------------------------------


def test_a_session_answers_come_in_its_message_order_errors_included(srv: RunningServer) -> None:
    """A validation error for a session's second message must not overtake its first, slow, step."""
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
        with RuntimeDouble(version(srv)) as rt:
            rt.delay = 0.2
            msgs = [
                pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW),
                pb.ObserveRequest(session_id=sid, sequence=2, rows=matrix(np.ones((1, 3)))),  # wrong width
                pb.ObserveRequest(session_id=sid, sequence=2, rows=ROW),
            ]
            replies = list(stub.Stream(iter(msgs), timeout=20))
    kinds = [(r.sequence, r.WhichOneof("result")) for r in replies]
    assert kinds == [(1, "forecast"), (2, "error"), (2, "forecast")], kinds
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_retry_with_different_rows_is_refused(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    values = taylor_values()
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:500]))).session_id
    first = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(values[500:502])))
    same = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(values[500:502])))
    np.testing.assert_array_equal(array(same.forecast), array(first.forecast))
    session = srv.app.sessions.get(sid)
    assert isinstance(session.last_digest, bytes) and len(session.last_digest) > 0
    for other in (values[600:602], values[500:501]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(other)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already applied with different rows" in err.value.details()
    # on a stream too, and the session still continues
    replies = list(
        stub.Stream(
            iter(
                [
                    pb.ObserveRequest(session_id=sid, sequence=1, rows=matrix(values[700:702])),
                    pb.ObserveRequest(session_id=sid, sequence=2, rows=matrix(values[502:503])),
                ]
            )
        )
    )
    assert replies[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    whole = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(values[:503])])).forecasts[0]
    np.testing.assert_allclose(array(replies[1].forecast), array(whole), rtol=1e-4)


def test_a_stream_that_never_reads_is_held_back(srv: RunningServer) -> None:
    """A client writes thousands of steps and reads nothing: the server stops reading after a bounded
    number of unanswered messages (max_stream_inflight=8, plus what the transport buffers), instead of
    applying them all and buffering every answer. Once the client reads, everything is answered.
    The client turns off HTTP/2 BDP probing so that its receive window stays at 64 KiB (about 270 of
    these answers); with probing on, the window grows to megabytes and absorbs a run this size."""
    values = taylor_values()
    n_sessions, per_session = 40, 150
    with grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        ids = [stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id for _ in range(n_sessions)]
        sessions = [srv.app.sessions.get(s) for s in ids]

        def messages() -> Iterator[pb.ObserveRequest]:
            for t in range(per_session):
                for sid in ids:
                    yield pb.ObserveRequest(session_id=sid, sequence=t + 1, rows=matrix(values[t : t + 1]))

        replies = stub.Stream(messages(), timeout=60)
        applied = lambda: sum(s.last_seq for s in sessions)  # noqa: E731
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.5:  # until the server stops making progress
            now = applied()
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.05)
        total = n_sessions * per_session
        print(f"\nsteps applied while the client read nothing: {last} of {total}")
        assert last < 1000, f"{last} of {total} steps applied for a client that reads nothing"
        got = list(replies)
    assert len(got) == total and all(r.WhichOneof("result") == "forecast" for r in got)
    assert applied() == total


def test_a_short_history_is_reported_and_counted(stub: pb_grpc.ForecasterStub, srv: RunningServer) -> None:
    from tests.test_server import metric

    values = taylor_values()
    before = metric(srv, "gatecast_sessions_short_history_total", model="taylor")
    short = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:100])))
    assert short.short_history and (short.history_rows, short.context_length) == (100, 432)
    full = stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(values[:432])))
    assert not full.short_history and full.history_rows == 432
    empty = stub.OpenSession(pb.OpenSessionRequest(model="taylor"))
    assert empty.short_history and empty.history_rows == 0
    assert metric(srv, "gatecast_sessions_short_history_total", model="taylor") == before + 2


def test_model_info_carries_the_model_card(stub: pb_grpc.ForecasterStub, taylor_repo: Path) -> None:
    m = Manifest.read(taylor_repo / "taylor" / "1")
    info = stub.GetModel(pb.GetModelRequest(name="taylor"))
    assert list(info.warnings) == m.warnings and info.beats_baselines == m.beats_baselines
    assert info.step == m.step and list(info.seasons) == m.seasons and list(info.quantiles) == m.quantiles
    want = {} if m.validation is None else {k: s.mae for k, s in m.validation.scores.items()}
    assert {s.forecaster: s.mae for s in info.validation_metrics} == pytest.approx(want)
    listed = {(i.name, i.version): i for i in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed[("taylor", 1)].beats_baselines == m.beats_baselines


# --- quantile models -------------------------------------------------------------------------------------


def _quantile_model(folder: Path, quantiles: list[float]) -> Manifest:
    """A small hand-built graph with an LSTM-free recurrence: hn = h0 + sum of x over time;
    y = hn broadcast over the horizon; q = y * (1 + quantile level)."""
    import onnx
    from onnx import TensorProto, helper

    from gatecast.manifest import ONNX_FILE, sha256_file

    horizon, nq = 3, len(quantiles)
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes1"], ["xs"], keepdims=0),  # [batch, 1]
        helper.make_node("Unsqueeze", ["xs", "axes0"], ["xs3"]),  # [1, batch, 1]
        helper.make_node("Add", ["h0", "xs3"], ["hn"]),  # [1, batch, 1]
        helper.make_node("Transpose", ["hn"], ["hb"], perm=[1, 0, 2]),  # [batch, 1, 1]
        helper.make_node("Expand", ["hb", "yshape"], ["y"]),  # [batch, horizon, 1]
        helper.make_node("Unsqueeze", ["y", "axes3"], ["y4"]),  # [batch, horizon, 1, 1]
        helper.make_node("Mul", ["y4", "levels"], ["q"]),  # [batch, horizon, 1, nq]
    ]
    inits = [
        helper.make_tensor("axes1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("axes3", TensorProto.INT64, [1], [3]),
        helper.make_tensor("yshape", TensorProto.INT64, [3], [1, horizon, 1]),
        helper.make_tensor("levels", TensorProto.FLOAT, [nq], [1.0 + q for q in quantiles]),
    ]
    graph = helper.make_graph(
        nodes,
        "quantile_sum",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 1]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", horizon, 1]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 1]),
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", horizon, 1, nq]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / ONNX_FILE))
    base = Manifest.read(taylor_folder()).model_dump()
    base.update(
        name="qsum",
        version=1,
        horizon=horizon,
        context_length=4,
        input_form="level",
        season=0,
        quantiles=quantiles,
        states=[{"input": "h0", "output": "hn", "dims": (1, 1)}],
        scaler={"mean": [0.0], "std": [1.0]},
        onnx={"sha256": sha256_file(folder / ONNX_FILE), "opset": 17, "quantile_output": "q"},
    )
    manifest = Manifest.model_validate(base)
    manifest.write(folder)
    return manifest


def taylor_folder() -> Path:
    from tests.conftest import DEFAULT_MODEL

    return DEFAULT_MODEL / "1"


def test_quantile_forecasts_travel_in_every_answer(tmp_path: Path) -> None:
    levels = [0.1, 0.5, 0.9]
    _quantile_model(tmp_path / "qsum" / "1", levels)
    x = np.array([[1.0], [2.0], [4.0]], np.float32)  # sum 7

    def check(point: Any, quant: Any, total: float) -> None:
        np.testing.assert_allclose(array(point), np.full((3, 1), total))
        assert (quant.rows, quant.cols) == (3, 3)  # horizon x (targets * quantiles), target-major
        np.testing.assert_allclose(array(quant), np.tile([total * (1 + q) for q in levels], (3, 1)), rtol=1e-6)

    with serve(tmp_path, chunk_rows=2) as s, grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        info = stub.GetModel(pb.GetModelRequest(name="qsum"))
        assert list(info.quantiles) == pytest.approx(levels)
        reply = stub.Forecast(pb.ForecastRequest(model="qsum", series=[matrix(x), matrix(x[:1])]))
        assert list(reply.quantiles) == pytest.approx(levels) and len(reply.quantile_forecasts) == 2
        check(reply.forecasts[0], reply.quantile_forecasts[0], 7.0)  # three rows in two chunks, state carried
        check(reply.forecasts[1], reply.quantile_forecasts[1], 1.0)
        opened = stub.OpenSession(pb.OpenSessionRequest(model="qsum", history=matrix(x)))
        check(opened.forecast, opened.quantile_forecast, 7.0)
        step = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=1, rows=matrix(x[:1])))
        check(step.forecast, step.quantile_forecast, 8.0)
        again = stub.Observe(pb.ObserveRequest(session_id=opened.session_id, sequence=1, rows=matrix(x[:1])))
        check(again.forecast, again.quantile_forecast, 8.0)  # a retry answers the stored quantiles too
        (streamed,) = list(
            stub.Stream(iter([pb.ObserveRequest(session_id=opened.session_id, sequence=2, rows=matrix(x[1:2]))]))
        )
        check(streamed.forecast, streamed.quantile_forecast, 10.0)


def test_point_models_answer_no_quantiles(stub: pb_grpc.ForecasterStub) -> None:
    reply = stub.Forecast(pb.ForecastRequest(model="taylor", series=[ROW]))
    assert not reply.quantiles and not reply.quantile_forecasts
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
    step = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW))
    assert not step.HasField("quantile_forecast")
