"""Metrics that tell the truth: every counter at 0 from the load of its model, process metrics, latency
buckets that resolve the real range, and the onnxruntime provider chosen quietly and said once."""

from __future__ import annotations

import ctypes.util
import logging
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatecast.service.runtime import ModelLoadError, select_providers
from gatecast.v1 import forecaster_pb2 as pb
from tests.conftest import RunningServer, server_settings
from tests.test_lifecycle import SERVE, _copy_version, _taylor_repo, _wait

RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["Forecaster"].methods]
CODES = [
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
]
VERSION_COUNTERS = [
    "gatecast_sessions_opened",
    "gatecast_sessions_closed",
    "gatecast_sessions_expired",
    "gatecast_sessions_rejected",
    "gatecast_sessions_short_history",
    "gatecast_queue_rejected",
]


def samples(srv: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: (name, labels) -> value."""
    url = f"http://127.0.0.1:{srv.app.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


@pytest.fixture()
def srv(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = RunningServer(server_settings(_taylor_repo(tmp_path, (1, 2))))
    yield server
    server.stop()


def test_every_counter_exists_at_zero_once_its_model_loads(srv: RunningServer) -> None:
    got = samples(srv)
    for version in ("1", "2"):
        for name in VERSION_COUNTERS:
            assert got.get((name + "_total", labels(model="taylor", version=version))) == 0, (name, version)
        assert got.get(("gatecast_live_sessions", labels(model="taylor", version=version))) == 0
        assert got[("gatecast_model_loaded", labels(model="taylor", version=version, provider="CPUExecutionProvider"))]
    for model in ("taylor", ""):  # "": requests naming no loaded model
        for rpc in RPCS:
            for code in CODES:
                key = ("gatecast_requests_total", labels(rpc=rpc, model=model, code=code))
                assert got.get(key) == 0, key
    for rpc in RPCS:
        assert got.get(("gatecast_malformed_messages_total", labels(rpc=rpc))) == 0, rpc


def test_each_malformed_message_counts_once_in_every_rpc(srv: RunningServer) -> None:
    """A message whose bytes do not decode is counted once in gatecast_malformed_messages_total, whatever
    the rpc (counted where its status is made), and its call under no model."""
    import grpc

    bad = b"\x0a\x05ab"  # a string field cut short
    service = "/gatecast.v1.Forecaster/"
    with grpc.insecure_channel(srv.address) as ch:
        for rpc in ("Forecast", "Observe", "ObserveBatch"):
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(service + rpc)(bad, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for rpc in ("Stream", "StreamBatch"):
            replies = list(ch.stream_stream(service + rpc)(iter([bad]), timeout=10))
            assert len(replies) == 1 and b"not a valid" in replies[0]
    got = samples(srv)
    for rpc in ("Forecast", "Observe", "ObserveBatch", "Stream", "StreamBatch"):
        assert got.get(("gatecast_malformed_messages_total", labels(rpc=rpc))) == 1, rpc
    for rpc in ("Forecast", "Observe", "ObserveBatch", "Stream", "StreamBatch"):
        assert got.get(("gatecast_requests_total", labels(rpc=rpc, model="", code="INVALID_ARGUMENT"))) == 1, rpc


def test_a_version_takes_its_series_when_it_is_unloaded(srv: RunningServer, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "repo" / "taylor" / "2")
    _wait(lambda: [mv.version for mv in srv.app.repo.versions()] == [1] and not srv.app.repo.retiring, "v2 unloaded")
    got = samples(srv)
    assert not [key for key in got if ("version", "2") in key[1]]
    assert got.get(("gatecast_sessions_expired_total", labels(model="taylor", version="1"))) == 0
    # the request series of the name stay while the servicer may count on them
    assert got.get(("gatecast_requests_total", labels(rpc="Forecast", model="taylor", code="OK"))) == 0
    _copy_version(tmp_path / "repo" / "taylor" / "1", tmp_path / "repo" / "taylor" / "3", version=3)
    _wait(lambda: len(srv.app.repo.versions()) == 2, "v3 loaded")
    assert samples(srv).get(("gatecast_queue_rejected_total", labels(model="taylor", version="3"))) == 0


def test_process_metrics_are_exported(srv: RunningServer) -> None:
    got = {name: value for (name, _), value in samples(srv).items()}
    assert got["process_resident_memory_bytes"] > 10e6
    assert got["process_cpu_seconds_total"] > 0
    assert got["process_open_fds"] > 3
    assert got["process_max_fds"] >= got["process_open_fds"]
    # onnxruntime's native threads count too: more than Python's threading module knows about
    assert got["gatecast_process_threads"] > 2
    assert "python_info" in got


def test_latency_buckets_resolve_sub_millisecond_runs_and_2_to_5_ms_requests(srv: RunningServer) -> None:
    for name in ("gatecast_model_run_seconds_bucket", "gatecast_queue_wait_seconds_bucket"):
        bounds = sorted(
            float(dict(labelset)["le"])
            for metric, labelset in samples(srv)
            if metric == name and ("version", "1") in labelset
        )
        assert bounds[0] <= 0.0001 and bounds[-2] >= 10, bounds  # the last is +Inf
        assert len([b for b in bounds if 0.0002 < b < 0.001]) >= 3, bounds  # 0.2-1 ms: four buckets or more
        assert len([b for b in bounds if 0.002 < b < 0.005]) >= 2, bounds  # 2-5 ms: three buckets or more


def _gpu_driver() -> bool:
    return ctypes.util.find_library("cuda") is not None


def test_providers_not_in_the_build_are_skipped_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    choose = select_providers.__wrapped__  # not the per-process cache: each call here logs
    with caplog.at_level(logging.INFO, "gatecast.service.runtime"):
        assert choose(("ROCMExecutionProvider", "CPUExecutionProvider")) == ("CPUExecutionProvider",)
    [line] = [r.getMessage() for r in caplog.records if "onnxruntime provider" in r.getMessage()]
    assert line.startswith("onnxruntime provider: CPUExecutionProvider (ROCM not available: not in this onnxruntime")
    with pytest.raises(ModelLoadError, match="ROCM not available"):
        choose(("ROCMExecutionProvider",))
    if not _gpu_driver():
        with pytest.raises(ModelLoadError, match=r"CUDA not available: no NVIDIA driver \(libcuda.so.1 not found\)"):
            choose(("CUDAExecutionProvider",))


def test_serve_without_a_gpu_starts_quietly_and_names_its_provider_once(tmp_path: Path) -> None:
    """The default providers (CUDA, then CPU) on this machine: no red onnxruntime error, no ERROR line, and
    one plain line for the two versions loaded."""
    repo = _taylor_repo(tmp_path, (1, 2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATECAST_")}
    proc = subprocess.Popen(
        [*SERVE, "--repo", str(repo), "--port", "0", "--metrics-port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    log = "".join(lines) + rest
    assert "listening on" in log, log
    assert re.search(r"listening on .*, event loop uvloop$", log, re.M), log  # the default where installed
    assert proc.returncode == 0, log
    assert "[E:onnxruntime" not in log and "Failed to create CUDAExecutionProvider" not in log, log
    assert not re.search(r" (ERROR|CRITICAL) ", log), log
    said = re.findall(r"(INFO|WARNING) gatecast.service.runtime: (onnxruntime provider: .*)", log)
    assert len(said) == 1, log
    if _gpu_driver():
        assert "CUDA" in said[0][1], said  # a GPU with a driver: CUDA runs, or the line says why it cannot
    else:
        why = "CUDA not available: no NVIDIA driver (libcuda.so.1 not found)"
        assert said[0] == ("INFO", f"onnxruntime provider: CPUExecutionProvider ({why})")
    assert log.count("on CPUExecutionProvider") >= 2 or _gpu_driver()  # both versions loaded, on the CPU


def test_observe_many_counts_what_observe_counts() -> None:
    """The Stream's latency histogram takes a block's steps in one pass: every bucket (bounds included,
    beyond the last one too), the count and the sum must be what observing them one by one gives."""
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram

    from gatecast.service.metrics import _LATENCY, observe_many

    registry = CollectorRegistry()
    h = Histogram("t", "t", ["way"], registry=registry, buckets=_LATENCY)
    rng = np.random.default_rng(0)
    amounts = [*_LATENCY[:-1], 0.0, 1e-6, 11.0, 1e9, *rng.exponential(0.01, 500).tolist()]
    for a in amounts:
        h.labels("one").observe(a)
    observe_many(h.labels("many"), amounts)
    observe_many(h.labels("few"), amounts[:3])  # below the vectorised size: one by one
    for a in amounts[3:]:
        h.labels("few").observe(a)

    def samples(way: str) -> dict[tuple[str, str | None], float]:
        return {
            (s.name, s.labels.get("le")): s.value
            for m in registry.collect()
            for s in m.samples
            if s.labels.get("way") == way and not s.name.endswith("_created")
        }

    one = samples("one")
    for way in ("many", "few"):
        got = samples(way)
        assert got.keys() == one.keys()
        for k, v in one.items():
            assert got[k] == pytest.approx(v, rel=1e-12), (way, k)
