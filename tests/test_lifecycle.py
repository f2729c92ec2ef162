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
from gatecast.service.settings import SettingsError, load_settings
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, ROOT, TAYLOR, RunningServer, array, matrix, server_settings, taylor_values
from tests.test_reliability_engine import RuntimeDouble
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
            with RuntimeDouble(srv.app.repo.resolve("taylor")) as rt:
                rt.gate.clear()
                held = stub.Forecast.future(pb.ForecastRequest(model="taylor", series=[ROW, ROW]))
                assert rt.started.wait(10)
                with pytest.raises(grpc.RpcError) as e:
                    stub.Forecast(pb.ForecastRequest(model="taylor", series=[ROW]))
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "batch queue full" in e.value.details()
                rt.gate.set()
                assert len(held.result(timeout=10).forecasts) == 2
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
    code = (
        "import sys, gatecast.service.main, gatecast.service.server, gatecast.client, gatecast.cli; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_server_without_a_store_never_imports_redis() -> None:
    """redis (and the cryptography it pulls in) is 9 MiB of every server's memory: only a configured
    session store imports it."""
    code = "import sys, gatecast.service.main, gatecast.service.server; sys.exit('redis' in sys.modules)"
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


# --- start, stop and the model repository ----------------------------------------------------------


def _taylor_repo(tmp_path: Path, versions: tuple[int, ...] = (1,)) -> Path:
    """The committed default model (no training needed) as the given versions."""
    repo = tmp_path / "repo"
    for v in versions:
        _copy_version(DEFAULT_MODEL / "1", repo / "taylor" / str(v), version=v)
    return repo


def _copy_version(src: Path, dst: Path, **manifest_changes: object) -> None:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def _wait(condition, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


SERVE = [sys.executable, "-m", "gatecast.cli", "serve"]


def test_second_server_on_a_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    repo = _taylor_repo(tmp_path)
    srv = RunningServer(server_settings(repo))
    try:
        env = {**os.environ, "GATECAST_PROVIDERS": '["CPUExecutionProvider"]'}
        for flags, what in [
            (["--port", str(srv.app.port), "--metrics-port", "0"], "gRPC port"),
            (["--port", "0", "--metrics-port", str(srv.app.metrics_port)], "metrics port"),
        ]:
            proc = subprocess.run(
                [*SERVE, "--repo", str(repo), *flags], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
            )
            assert proc.returncode == 2, f"a second server started on the {what} in use: {proc.stderr}"
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and what in lines[0] and "in use" in lines[0], proc.stderr
        with grpc.insecure_channel(srv.address) as ch:  # the first server still has the port to itself
            assert pb_grpc.ForecasterStub(ch).GetModel(pb.GetModelRequest(name="taylor")).version == 1
    finally:
        srv.stop()


def test_start_up_problems_are_one_line_and_a_non_zero_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _taylor_repo(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "bad.toml").write_text("max_batch_size = [\n")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")  # found by a hostile test: a traceback, exit 1
    (tmp_path / "folder.toml").mkdir()
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--repo", str(tmp_path / "missing")], {}, "no such folder"),
        (["--repo", str(tmp_path / "file")], {}, "not a folder"),
        (
            ["--repo", str(repo)],
            {"GATECAST_MAX_BATCH": "8"},
            "GATECAST_MAX_BATCH (did you mean GATECAST_MAX_BATCH_SIZE?)",
        ),
        (["--repo", str(repo)], {"GATECAST_PROVIDERS": "CPUExecutionProvider"}, "providers"),
        (["--repo", str(repo), "--settings", str(tmp_path / "bad.toml")], {}, "bad.toml"),
        (["--repo", str(repo), "--settings", str(tmp_path / "binary.toml")], {}, "binary.toml: not UTF-8 text"),
        (["--repo", str(repo), "--settings", str(tmp_path / "folder.toml")], {}, "folder.toml: no such file"),
        (["--repo", str(repo), "--port", "99999"], {}, "GATECAST_PORT"),
        (["--repo", str(repo)], {"GATECAST_SNAPSHOT_PATH": str(tmp_path / "no" / "s.snap")}, "cannot be written"),
    ]
    for args, env, expected in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main(["serve", "--port", "0", "--metrics-port", "0", *args]) == 2, (args, env)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0], (args, env, err)
        for k in env:
            monkeypatch.delenv(k)


def test_unreadable_repository_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gatecast.service.repository import check_repo

    repo = _taylor_repo(tmp_path)
    check_repo(repo)
    if os.geteuid() == 0:  # chmod cannot stop root: pretend
        monkeypatch.setattr(os, "access", lambda *a, **k: False)
    else:
        repo.chmod(0)
    try:
        with pytest.raises(SettingsError, match="not readable"):
            check_repo(repo)
    finally:
        repo.chmod(0o755)


def _health(address: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="")).status  # type: ignore[no-any-return]


def test_health_is_not_serving_until_a_model_loads(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2

    repo = tmp_path / "repo"
    repo.mkdir()
    srv = RunningServer(server_settings(repo))
    try:
        assert _health(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        _copy_version(DEFAULT_MODEL / "1", repo / "taylor" / "1")
        _wait(lambda: _health(srv.address) == health_pb2.HealthCheckResponse.SERVING, "health says SERVING")
    finally:
        srv.stop()


def _default_version(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ForecasterStub(ch).GetModel(pb.GetModelRequest(name="taylor")).version  # type: ignore[no-any-return]


def _listed(address: str) -> list[tuple[str, int]]:
    with grpc.insecure_channel(address) as ch:
        return [(m.name, m.version) for m in pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest()).models]


def test_version_folder_copied_file_by_file_is_retried_until_it_loads(tmp_path: Path) -> None:
    repo = _taylor_repo(tmp_path)
    srv = RunningServer(server_settings(repo))
    try:
        v2 = repo / "taylor" / "2"
        v2.mkdir()
        manifest = json.loads((repo / "taylor" / "1" / "manifest.json").read_text())
        (v2 / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))  # the manifest first
        _wait(lambda: v2 in srv.app.repo.failures, "loading v2 without its graph failed")
        graph = (repo / "taylor" / "1" / "model.onnx").read_bytes()
        with (v2 / "model.onnx").open("wb") as f:  # then half of the graph
            f.write(graph[: len(graph) // 2])
        _wait(lambda: "sha256" in srv.app.repo.failures.get(v2, ""), "the half-written graph was tried")
        assert _default_version(srv.address) == 1
        with (v2 / "model.onnx").open("ab") as f:  # then the rest, in place
            f.write(graph[len(graph) // 2 :])
        _wait(lambda: _default_version(srv.address) == 2, "v2 loads once complete")
        assert v2 not in srv.app.repo.failures
    finally:
        srv.stop()


def _with_quantile_output(src: Path, dst: Path, quantiles: list[float]) -> None:
    """A copy of the taylor graph with an extra output `yq` [batch, horizon, targets, 3] (y repeated)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from gatecast.manifest import sha256_file

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    g = model.graph
    y = json.loads((dst / "manifest.json").read_text())["onnx"]["output"]
    g.initializer.append(numpy_helper.from_array(np.array([3], np.int64), "yq_axes"))
    g.node.extend(
        [
            helper.make_node("Unsqueeze", [y, "yq_axes"], ["yq_one"]),
            helper.make_node("Concat", ["yq_one", "yq_one", "yq_one"], ["yq"], axis=3),
        ]
    )
    g.output.append(helper.make_tensor_value_info("yq", TensorProto.FLOAT, ["batch", "horizon", "targets", 3]))
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = int(dst.name)
    manifest["quantiles"] = quantiles
    manifest["onnx"].update(quantile_output="yq", sha256=sha256_file(dst / "model.onnx"))
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_graph_outputs_are_checked_against_the_manifest(tmp_path: Path) -> None:
    repo = _taylor_repo(tmp_path)
    src = repo / "taylor" / "1"
    horizon = json.loads((src / "manifest.json").read_text())["horizon"]
    _copy_version(src, repo / "taylor" / "2", version=2, horizon=horizon // 2)  # the manifest lies about y
    _with_quantile_output(src, repo / "taylor" / "3", [0.1, 0.5, 0.9])  # right: 3 quantiles
    _with_quantile_output(src, repo / "taylor" / "4", [0.25, 0.75])  # wrong: the graph has 3
    srv = RunningServer(server_settings(repo))
    try:
        failures = srv.app.repo.failures
        assert f"horizon {horizon // 2}" in failures[repo / "taylor" / "2"]
        assert "quantiles 2" in failures[repo / "taylor" / "4"]
        assert _listed(srv.address) == [("taylor", 1), ("taylor", 3)]
        assert _default_version(srv.address) == 3  # never a refused version
    finally:
        srv.stop()


def test_deleted_version_is_unloaded_once_no_session_uses_it(tmp_path: Path) -> None:
    repo = _taylor_repo(tmp_path, (1, 2))
    srv = RunningServer(server_settings(repo))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
            assert stub.GetModel(pb.GetModelRequest(name="taylor")).version == 2
            shutil.rmtree(repo / "taylor" / "2")
            _wait(lambda: _default_version(srv.address) == 1, "v1 is the default again")
            assert _listed(srv.address) == [("taylor", 1)]
            with pytest.raises(grpc.RpcError) as e:
                stub.GetModel(pb.GetModelRequest(name="taylor", version=2))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            reply = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW))  # its session goes on
            assert reply.forecast.rows == 48
            time.sleep(0.5)  # a few polls: still loaded while the session lives
            assert [(mv.name, mv.version) for mv in srv.app.repo.retiring] == [("taylor", 2)]
            assert metric(srv, "gatecast_model_loaded", model="taylor", version="2") == 1
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            _wait(lambda: not srv.app.repo.retiring, "v2 is unloaded")
            assert metric(srv, "gatecast_model_loaded", model="taylor", version="2") == 0
    finally:
        srv.stop()


def test_sighup_drains_like_sigterm(tmp_path: Path) -> None:
    proc, port = start_server(_taylor_repo(tmp_path), {"GATECAST_MAX_QUEUE_DELAY_MS": "300"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                pending = ex.submit(stub.Forecast, pb.ForecastRequest(model="taylor", series=[ROW]), timeout=10)
                time.sleep(0.1)  # the request now waits in the batcher (300 ms delay)
                proc.send_signal(signal.SIGHUP)
                reply = pending.result()
        assert reply.forecasts[0].rows == 48
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_folders_that_only_loosely_read_as_versions_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a hostile operator: a folder named "²" (str.isdigit() but not int()) stopped the start with a
    traceback and, appearing later, failed every scan of the repository; "01" beside "1" are two folders for
    one version, and whichever was listed last won (a stale "01" holding only a manifest hid a complete "1")."""
    from gatecast.manifest import version_dirs

    repo = _taylor_repo(tmp_path)
    model = repo / "taylor"
    (model / "01").mkdir()
    shutil.copy(model / "1" / "manifest.json", model / "01" / "manifest.json")  # a stale, incomplete copy
    for name in ("0", "²", "١"):
        (model / name).mkdir()
    odd: list[Path] = []
    assert version_dirs(model, odd) == {1: model / "1"}
    assert sorted(p.name for p in odd) == sorted(["01", "0", "²", "١"])
    srv = RunningServer(server_settings(repo))
    try:
        assert _listed(srv.address) == [("taylor", 1)]
        _copy_version(DEFAULT_MODEL / "1", model / "2", version=2)  # later versions are still found
        _wait(lambda: _listed(srv.address) == [("taylor", 1), ("taylor", 2)], "v2 is loaded")
        warned = [r.getMessage() for r in caplog.records if "is not a version folder" in r.getMessage()]
        assert sorted(Path(w.split(" is not")[0]).name for w in warned) == sorted(p.name for p in odd)  # once each
    finally:
        srv.stop()


def test_a_background_job_failing_the_same_way_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a hostile test: with the snapshot folder removed, every periodic snapshot logged a full
    traceback (about 20 lines every snapshot_interval_s). Now the first failure has its traceback, the same
    failure again one line, another failure its own traceback, and recovery one line."""
    import asyncio

    from gatecast.service.server import App

    outcomes: list[Exception | None] = [OSError("gone"), OSError("gone"), OSError("gone"), ValueError("x"), None]

    async def _snapshot() -> None:
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    async def run() -> None:
        task = asyncio.create_task(App._every(0.001, _snapshot))
        while outcomes:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
        task.cancel()

    caplog.set_level("INFO", logger="gatecast.service.server")
    asyncio.run(run())
    records = [r for r in caplog.records if "background job _snapshot" in r.getMessage()]
    assert [(r.getMessage().split(" _snapshot ")[1].split(":")[0], r.exc_info is not None) for r in records] == [
        ("failed", True),
        ("failed again", False),
        ("failed again", False),
        ("failed", True),
        ("succeeded again", False),
    ]
