"""Server life: hot reload, limits (pool, queue, deadline, idle expiry), settings, SIGTERM, the client CLI."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.load import start_server
from gatecast.cli import main
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from service.settings import SettingsError, load_settings
from tests.conftest import ROOT, TAYLOR, RunningServer, array, matrix, server_settings, taylor_values
from tests.test_server import metric

ROW = matrix(np.array([[30000.0]]))


def _only_taylor(tmp_path: Path, model_repo: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "taylor", repo / "taylor")
    return repo


def test_new_version_loads_without_restart_or_failed_request(tmp_path: Path, model_repo: Path) -> None:
    repo = _only_taylor(tmp_path, model_repo)
    srv = RunningServer(server_settings(repo))
    errors: list[Exception] = []
    stop = threading.Event()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            history = taylor_values()[:400]
            session = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id

            def hammer() -> None:
                while not stop.is_set():
                    try:
                        stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(history)]), timeout=10)
                    except Exception as e:
                        errors.append(e)

            worker = threading.Thread(target=hammer)
            worker.start()
            staging = repo / "taylor" / ".staging-copy"
            shutil.copytree(repo / "taylor" / "1", staging)
            manifest = json.loads((staging / "manifest.json").read_text())
            manifest["version"] = 2
            (staging / "manifest.json").write_text(json.dumps(manifest))
            os.rename(staging, repo / "taylor" / "2")
            deadline = time.monotonic() + 20
            while stub.GetModel(pb.GetModelRequest(name="taylor")).version != 2:
                assert time.monotonic() < deadline, "version 2 never became the default"
                time.sleep(0.1)
            reply = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(history)]))
            assert reply.version == 2
            stop.set()
            worker.join()
            # the session stays on the version it opened with
            stub.Observe(pb.ObserveRequest(session_id=session, sequence=1, rows=ROW))
            info = stub.GetModel(pb.GetModelRequest(name="taylor", version=1))
            assert info.live_sessions == 1 and not info.is_default
        assert not errors, errors[:3]
    finally:
        stop.set()
        srv.stop()


def test_session_cap_and_queue_limit_answer_resource_exhausted(tmp_path: Path, model_repo: Path) -> None:
    srv = RunningServer(
        server_settings(_only_taylor(tmp_path, model_repo), max_sessions=2, max_queue_size=1, initial_session_slots=1)
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            ids = [stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id for _ in range(2)]
            with pytest.raises(grpc.RpcError) as e:
                stub.OpenSession(pb.OpenSessionRequest(model="taylor"))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 live sessions" in e.value.details() and "GATECAST_MAX_SESSIONS" in e.value.details()
            stub.CloseSession(pb.CloseSessionRequest(session_id=ids[0]))
            stub.OpenSession(pb.OpenSessionRequest(model="taylor"))  # a freed slot is reused
            with pytest.raises(grpc.RpcError) as e:
                stub.Forecast(pb.ForecastRequest(model="taylor", series=[ROW, ROW]))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "batch queue full" in e.value.details()
        assert metric(srv, "gatecast_sessions_rejected_total", model="taylor") == 1
        assert metric(srv, "gatecast_live_sessions", model="taylor") == 2
    finally:
        srv.stop()


def test_expired_deadline_is_not_run(tmp_path: Path, model_repo: Path) -> None:
    srv = RunningServer(server_settings(_only_taylor(tmp_path, model_repo), max_queue_delay_ms=600))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            before = metric(srv, "gatecast_model_run_seconds_count", model="taylor")
            with pytest.raises(grpc.RpcError) as e:
                stub.Forecast(pb.ForecastRequest(model="taylor", series=[ROW]), timeout=0.1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.0)  # past the batch delay: the item was dropped, not run
            assert metric(srv, "gatecast_model_run_seconds_count", model="taylor") == before
    finally:
        srv.stop()


def test_idle_sessions_expire(tmp_path: Path, model_repo: Path) -> None:
    srv = RunningServer(server_settings(_only_taylor(tmp_path, model_repo), session_idle_s=0.3))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
            time.sleep(1.2)
            with pytest.raises(grpc.RpcError) as e:
                stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in e.value.details()
        assert metric(srv, "gatecast_sessions_expired_total", model="taylor") == 1
        assert metric(srv, "gatecast_live_sessions", model="taylor") == 0
    finally:
        srv.stop()


def test_bad_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATECAST_MAX_BATCH_SIZE", "0")
    with pytest.raises(SettingsError, match="GATECAST_MAX_BATCH_SIZE"):
        load_settings()
    monkeypatch.delenv("GATECAST_MAX_BATCH_SIZE")
    (tmp_path / "s.toml").write_text("max_queue_delay_ms = -1\n")
    with pytest.raises(SettingsError, match="GATECAST_MAX_QUEUE_DELAY_MS"):
        load_settings(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text("max_queue_delay_ms = 5\n")
    monkeypatch.setenv("GATECAST_MAX_QUEUE_DELAY_MS", "7")
    assert load_settings(tmp_path / "s.toml").max_queue_delay_ms == 7  # environment over file
    assert load_settings(tmp_path / "s.toml", max_queue_delay_ms=9).max_queue_delay_ms == 9  # flags over both
    env = {**os.environ, "GATECAST_PORT": "99999"}
    proc = subprocess.run(
        [sys.executable, "-m", "gatecast.cli", "serve"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 2 and "GATECAST_PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_finishes_in_flight_work_and_exits(model_repo: Path, tmp_path: Path) -> None:
    repo = _only_taylor(tmp_path, model_repo)
    proc, port = start_server(repo, {"GATECAST_MAX_QUEUE_DELAY_MS": "300"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                pending = ex.submit(stub.Forecast, pb.ForecastRequest(model="taylor", series=[ROW]), timeout=10)
                time.sleep(0.1)  # the request now waits in the batcher (300 ms delay)
                proc.send_signal(signal.SIGTERM)
                reply = pending.result()
        assert reply.forecasts[0].rows == 48
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_service_never_imports_torch() -> None:
    code = "import sys, service.main, service.server, service.client, gatecast.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    from gatecast.codegen import generate

    generate(tmp_path)
    for produced in (tmp_path / "gatecast" / "v1").iterdir():
        committed = ROOT / "gatecast" / "v1" / produced.name
        assert committed.read_text() == produced.read_text(), f"{committed} is stale: run `make proto`"


def test_forecast_cli(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["forecast", "--data", str(TAYLOR), "--model", "taylor", "--server", server.address, "--format", "json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ForecasterStub(ch)
        context = stub.GetModel(pb.GetModelRequest(name="taylor")).context_length
        want = stub.Forecast(pb.ForecastRequest(model="taylor", series=[matrix(taylor_values()[-context:])]))
    np.testing.assert_allclose(np.array(out["forecast"]), array(want.forecasts[0]), rtol=1e-6)
    assert main(["forecast", "--data", str(TAYLOR), "--model", "nope", "--server", server.address]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
