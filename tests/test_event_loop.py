"""The `event_loop` setting: the server and its Forecast workers run on uvloop or on asyncio's own loop, and
answer the same bytes on either (the rest of the suite runs the default, uvloop)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gatecast.service import loops
from gatecast.service.settings import SettingsError, load_settings
from gatecast.v1 import forecaster_pb2 as pb
from tests.conftest import DEFAULT_MODEL, RunningServer, matrix, server_settings, taylor_values

FORECAST = "/gatecast.v1.Forecaster/Forecast"
KINDS = ["uvloop", "asyncio"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[dict[str, RunningServer]]:
    """One server per kind of loop, each with one Forecast worker, over the same repository."""
    repo = tmp_path_factory.mktemp("loops")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    shutil.copytree(model_repo / "tiny_lstm", repo / "tiny_lstm")
    running: dict[str, RunningServer] = {}
    try:
        for kind in KINDS:
            running[kind] = RunningServer(server_settings(repo, forecast_workers=1, event_loop=kind))
        for srv in running.values():
            assert srv.app.forecasts is not None
            assert srv.call(srv.app.forecasts.ready(60))
        yield running
    finally:
        for srv in running.values():
            srv.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_and_its_worker_run_on_the_loop_chosen(servers: dict[str, RunningServer], kind: str) -> None:
    srv = servers[kind]
    assert loops.kind(srv.loop) == kind
    assert srv.app.metrics.registry.get_sample_value("gatecast_event_loop", {"loop": kind}) == 1.0
    other = next(k for k in KINDS if k != kind)
    assert srv.app.metrics.registry.get_sample_value("gatecast_event_loop", {"loop": other}) is None
    assert srv.app.forecasts is not None
    worker = srv.app.forecasts.workers[0].proc
    assert worker.args[-1] == kind  # type: ignore[index]
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert ("uvloop" in maps) == (kind == "uvloop"), "the worker's loop is not the one it was told"


def _stream_batch(address: str, ids: list[str], rows: np.ndarray) -> list[bytes]:
    """Each row stepped into every session, one StreamBatch message per row; the answers' bytes."""
    messages = [
        pb.ObserveBatchRequest(
            steps=[pb.ObserveRequest(session_id=sid, sequence=k + 1, rows=matrix(r[None, :])) for sid in ids]
        ).SerializeToString()
        for k, r in enumerate(rows)
    ]
    with grpc.insecure_channel(address) as ch:
        return list(ch.stream_stream("/gatecast.v1.Forecaster/StreamBatch")(iter(messages), timeout=60))


def test_answers_are_the_same_bytes_on_either_loop(servers: dict[str, RunningServer]) -> None:
    values = taylor_values()
    forecast = pb.ForecastRequest(
        model="taylor", series=[matrix(values[:432]), matrix(values[100:700])]
    ).SerializeToString()
    got: dict[str, list[bytes]] = {}
    for kind, srv in servers.items():
        with grpc.insecure_channel(srv.address) as ch:
            answers = [ch.unary_unary(FORECAST)(forecast, timeout=60)]  # by the worker
            stub_open = ch.unary_unary(
                "/gatecast.v1.Forecaster/OpenSession",
                request_serializer=pb.OpenSessionRequest.SerializeToString,
                response_deserializer=pb.OpenSessionResponse.FromString,
            )
            opened = [stub_open(pb.OpenSessionRequest(model="tiny_lstm"), timeout=30) for _ in range(3)]
        ids = [o.session_id for o in opened]
        for reply in _stream_batch(srv.address, ids, values[:5]):
            results = pb.ObserveBatchResponse.FromString(reply).results
            assert [r.session_id for r in results] == ids and all(r.HasField("forecast") for r in results)
            for sid in ids:  # session ids differ between the servers: compare the rest
                reply = reply.replace(sid.encode(), b"")
            answers.append(reply)
        # the first session's next steps on a one-row Stream, the second's by Observe
        steps = [
            pb.ObserveRequest(session_id=ids[0], sequence=6 + k, rows=matrix(values[5 + k : 6 + k])) for k in range(3)
        ]
        observe = pb.ObserveRequest(session_id=ids[1], sequence=6, rows=matrix(values[5:6]))
        with grpc.insecure_channel(srv.address) as ch:
            stream = ch.stream_stream("/gatecast.v1.Forecaster/Stream")
            replies = list(stream(iter(s.SerializeToString() for s in steps), timeout=60))
            answered = ch.unary_unary("/gatecast.v1.Forecaster/Observe")(observe.SerializeToString(), timeout=30)
        assert all(pb.StreamResponse.FromString(r).HasField("forecast") for r in replies)
        assert pb.ObserveResponse.FromString(answered).forecast.rows > 0
        answers += [r.replace(ids[0].encode(), b"") for r in replies] + [answered.replace(ids[1].encode(), b"")]
        got[kind] = answers
    assert len(got["uvloop"]) == 10
    assert got["uvloop"] == got["asyncio"]
    assert pb.ForecastResponse.FromString(got["uvloop"][0]).forecasts[0].rows == 48


def test_auto_takes_uvloop_when_installed_and_asyncio_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loops.resolve("auto") == "uvloop"  # a dependency of gatecast on Linux
    assert isinstance(loops.loop_factory("asyncio")(), asyncio.AbstractEventLoop)
    monkeypatch.setattr(loops, "uvloop_problem", lambda: "uvloop is not installed")
    assert loops.resolve("auto") == "asyncio"
    assert loops.loop_factory("auto") is asyncio.new_event_loop
    assert loops.run(asyncio.sleep(0, "ran"), "auto") == "ran"


def test_uvloop_asked_for_but_missing_or_an_unknown_loop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match=r"GATECAST_EVENT_LOOP: Input should be 'auto', 'uvloop' or 'asyncio'"):
        load_settings(None, repo=tmp_path, event_loop="tokio")
    import gatecast.service.settings as settings_module

    monkeypatch.setattr(settings_module, "uvloop_problem", lambda: "uvloop is not installed")
    with pytest.raises(SettingsError, match=r"event_loop is uvloop but uvloop is not installed: pip install uvloop"):
        load_settings(None, repo=tmp_path, event_loop="uvloop")
    assert load_settings(None, repo=tmp_path).event_loop == "auto"  # auto starts on asyncio instead


def test_a_uvloop_that_cannot_be_imported_is_named_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A uvloop that is installed but broken (here: its import raises) stops `event_loop=uvloop` with the
    reason, and makes `auto` run on asyncio's loop with a warning, instead of a traceback at start."""
    import builtins
    import sys

    real_import = builtins.__import__

    def broken(name: str, *args: object, **kw: object) -> object:
        if name == "uvloop":
            raise ImportError("libuv.so.1: cannot open shared object file")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    loops.uvloop_problem.cache_clear()
    try:
        assert (
            loops.uvloop_problem()
            == "uvloop cannot be imported: ImportError: libuv.so.1: cannot open shared object file"
        )
        with pytest.raises(
            SettingsError, match=r"event_loop is uvloop but uvloop cannot be imported: ImportError: libuv"
        ):
            load_settings(None, repo=tmp_path, event_loop="uvloop")
        with caplog.at_level("WARNING", logger="gatecast.service.loops"):
            assert loops.resolve("auto") == "asyncio"
        assert "event_loop auto: uvloop cannot be imported" in caplog.text
    finally:
        loops.uvloop_problem.cache_clear()  # computed again, with the real import, by whatever runs next


def _waits_under(srv: RunningServer, seconds: float) -> tuple[float, float]:
    """(requests that waited in the batch queue less than `seconds` (to the nearest bucket below), all)."""
    below, total = 0.0, 0.0
    for metric in srv.app.metrics.registry.collect():
        if metric.name != "gatecast_queue_wait_seconds":
            continue
        for s in metric.samples:
            if s.name.endswith("_bucket") and s.labels["model"] == "taylor" and float(s.labels["le"]) < seconds:
                below = max(below, s.value)
            if s.name.endswith("_count") and s.labels["model"] == "taylor":
                total += s.value
    return below, total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("delay_ms", [0.4, 2.5])
def test_a_batch_waits_its_whole_window_on_either_loop(model_repo: Path, kind: str, delay_ms: float) -> None:
    """`max_queue_delay_ms`: a lone request's batch closes once it has waited that long, not before. uvloop
    counts timers in whole milliseconds (running one under half a millisecond at once, and one up to a
    millisecond early), so the batcher rounds its wait up and reads the clock again after."""
    srv = RunningServer(server_settings(model_repo, event_loop=kind, max_queue_delay_ms=delay_ms))
    try:
        data = pb.ForecastRequest(model="taylor", series=[matrix(taylor_values()[:432])]).SerializeToString()
        with grpc.insecure_channel(srv.address) as ch:
            for _ in range(20):  # one at a time: each waits alone for its window
                ch.unary_unary(FORECAST)(data, timeout=30)
        below, total = _waits_under(srv, delay_ms / 1000 * 0.63)  # the bucket bound under the delay
        assert total == 20 and below == 0, f"{below:.0f} of {total:.0f} batches closed before their window"
    finally:
        srv.stop()
