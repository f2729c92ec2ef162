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
        got[kind] = answers
    assert len(got["uvloop"]) == 6
    assert got["uvloop"] == got["asyncio"]
    assert pb.ForecastResponse.FromString(got["uvloop"][0]).forecasts[0].rows == 48


def test_auto_takes_uvloop_when_installed_and_asyncio_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loops.resolve("auto") == "uvloop"  # a dependency of gatecast on Linux
    assert isinstance(loops.loop_factory("asyncio")(), asyncio.AbstractEventLoop)
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    assert loops.resolve("auto") == "asyncio"
    assert loops.loop_factory("auto") is asyncio.new_event_loop
    assert loops.run(asyncio.sleep(0, "ran"), "auto") == "ran"


def test_uvloop_asked_for_but_missing_or_an_unknown_loop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(SettingsError, match=r"GATECAST_EVENT_LOOP: Input should be 'auto', 'uvloop' or 'asyncio'"):
        load_settings(None, repo=tmp_path, event_loop="tokio")
    import gatecast.service.settings as settings_module

    monkeypatch.setattr(settings_module, "uvloop_installed", lambda: False)
    with pytest.raises(SettingsError, match=r"event_loop is uvloop but uvloop is not installed: pip install uvloop"):
        load_settings(None, repo=tmp_path, event_loop="uvloop")
    assert load_settings(None, repo=tmp_path).event_loop == "auto"  # auto starts on asyncio instead
