"""KServe v2 / Open Inference Protocol beside gatecast's own API (issue 10), on the real server.

NVIDIA's tritonclient, in a virtual environment of its own (its protobuf pin is not ours; the first run
creates it from the package index, later runs reuse it), checks that an unchanged KServe client works:
health, metadata, and forecasts equal to gatecast's own Forecast answer. Our generated stubs check the
error paths, quantile outputs, and that KServe requests share model runs with Forecast requests.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gatecast.inference import grpc_predict_v2_pb2 as kpb
from gatecast.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, ROOT, RunningServer, array, matrix, taylor_values
from tests.test_reliability_api import _quantile_model
from tests.test_reliability_engine import RuntimeDouble, serve, version, wait_for

TRITONCLIENT = "2.73.0"
LEVELS = [0.1, 0.5, 0.9]
LIMITS = {"max_series": 8, "max_rows": 1000, "max_request_rows": 2000}
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The default model (GRU, state h and s, horizon 48) and a quantile model."""
    repo = tmp_path_factory.mktemp("kserve")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    _quantile_model(repo / "qsum" / "1", LEVELS)
    with serve(repo, **LIMITS) as s:
        yield s


@pytest.fixture()
def kserve(srv: RunningServer) -> Iterator[kpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(srv.address) as ch:
        yield kpb_grpc.GRPCInferenceServiceStub(ch)


def windows(batch: int = 2, rows: int = 432) -> np.ndarray:
    values = taylor_values()
    return np.stack([values[1000 + 500 * i : 1000 + 500 * i + rows] for i in range(batch)])  # [batch, rows, 1]


def request(x: np.ndarray, model: str = "taylor", raw: bool = True, **kw: Any) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)
    req = kpb.ModelInferRequest(model_name=model, inputs=[tensor], **kw)
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        req.inputs[0].CopyFrom(tensor)
    return req


def outputs(reply: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    assert len(reply.raw_output_contents) == len(reply.outputs)
    found = {}
    for out, data in zip(reply.outputs, reply.raw_output_contents, strict=True):
        assert out.datatype == "FP32"
        found[out.name] = np.frombuffer(data, "<f4").reshape(list(out.shape))
    return found


def forecast(srv: RunningServer, x: np.ndarray) -> np.ndarray:
    """gatecast's own answer for the same windows, [batch, horizon, targets]."""
    with grpc.insecure_channel(srv.address) as ch:
        reply = pb_grpc.ForecasterStub(ch).Forecast(pb.ForecastRequest(model="taylor", series=[matrix(s) for s in x]))
    return np.stack([array(f) for f in reply.forecasts])


# --- health and metadata ---------------------------------------------------------------------------------


def test_health_and_model_readiness_follow_the_repository(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    assert kserve.ServerLive(kpb.ServerLiveRequest()).live
    assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
    ready = {
        (name, v): kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=v)).ready
        for name, v in [("taylor", ""), ("taylor", "1"), ("qsum", ""), ("taylor", "2"), ("taylor", "x"), ("nope", "")]
    }
    assert ready == {
        ("taylor", ""): True,
        ("taylor", "1"): True,
        ("qsum", ""): True,
        ("taylor", "2"): False,  # unknown version: not ready, not an error
        ("taylor", "x"): False,
        ("nope", ""): False,
    }
    server = kserve.ServerMetadata(kpb.ServerMetadataRequest())
    assert server.name == "gatecast" and server.version


def test_grpc_health_and_reflection_know_the_kserve_service(srv: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(srv.address) as ch:
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert health_pb2_grpc.HealthStub(ch).Check(check).status == health_pb2.HealthCheckResponse.SERVING
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([ask]))
        assert "inference.GRPCInferenceService" in {s.name for s in answer.list_services_response.service}


def test_server_ready_is_false_with_no_model(tmp_path: Path) -> None:
    with serve(tmp_path) as s, grpc.insecure_channel(s.address) as ch:
        stub = kpb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(kpb.ServerLiveRequest()).live
        assert not stub.ServerReady(kpb.ServerReadyRequest()).ready


def test_model_metadata_names_the_window_input_and_the_forecast_outputs(
    kserve: kpb_grpc.GRPCInferenceServiceStub,
) -> None:
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="taylor"))
    assert (meta.name, list(meta.versions), meta.platform) == ("taylor", ["1"], "onnx_onnxv1")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, -1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 48, 1])]
    q = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="qsum", version="1"))
    assert [(t.name, list(t.shape)) for t in q.outputs] == [("y", [-1, 3, 1]), ("q", [-1, 3, 1, 3])]
    for name, version_, code in [("nope", "", "NOT_FOUND"), ("taylor", "9", "NOT_FOUND"), ("taylor", "v1", "INVALID")]:
        with pytest.raises(grpc.RpcError) as e:
            kserve.ModelMetadata(kpb.ModelMetadataRequest(name=name, version=version_))
        assert e.value.code().name.startswith(code), e.value.details()


# --- inference ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "fp32_contents"])
def test_model_infer_equals_forecast(srv: RunningServer, kserve: kpb_grpc.GRPCInferenceServiceStub, raw: bool) -> None:
    x = windows(batch=3)
    reply = kserve.ModelInfer(request(x, raw=raw, id="abc", model_version="1"))
    assert (reply.model_name, reply.model_version, reply.id) == ("taylor", "1", "abc")
    got = outputs(reply)
    assert list(got) == ["y"]  # the recurrent state is not an output
    assert got["y"].shape == (3, 48, 1)
    np.testing.assert_allclose(got["y"], forecast(srv, x), rtol=1e-6, atol=1e-3)  # MW ~ 3e4: float32 rounding
    assert np.ptp(got["y"]) > 100  # a real forecast, not a constant


def test_quantile_outputs_and_requested_outputs(kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.array([[[1.0], [2.0], [4.0]], [[1.0], [1.0], [1.0]]], np.float32)  # sums 7 and 3
    both = outputs(kserve.ModelInfer(request(x, model="qsum")))
    assert list(both) == ["y", "q"]
    np.testing.assert_allclose(both["y"][:, :, 0], [[7.0] * 3, [3.0] * 3])
    want_q = np.array([[[[t * (1 + q) for q in LEVELS]]] * 3 for t in (7.0, 3.0)], np.float32)  # [2, 3, 1, 3]
    np.testing.assert_allclose(both["q"], want_q, rtol=1e-6)
    only_q = kpb.ModelInferRequest.InferRequestedOutputTensor(name="q")
    assert list(outputs(kserve.ModelInfer(request(x, model="qsum", outputs=[only_q])))) == ["q"]
    y_then_q = [kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("q", "y")]
    assert list(outputs(kserve.ModelInfer(request(x, model="qsum", outputs=y_then_q)))) == ["q", "y"]


def test_model_infer_shares_model_runs_with_forecast(srv: RunningServer) -> None:
    """With the model held busy, a Forecast and a ModelInfer that arrive meanwhile run in one batch."""
    x = windows(batch=1)
    mv = version(srv)
    with (
        grpc.insecure_channel(srv.address) as ch,
        RuntimeDouble(mv) as rt,
        concurrent.futures.ThreadPoolExecutor(3) as pool,
    ):
        stub, kserve = pb_grpc.ForecasterStub(ch), kpb_grpc.GRPCInferenceServiceStub(ch)
        rt.gate.clear()
        first = pool.submit(stub.Forecast, pb.ForecastRequest(model="taylor", series=[matrix(x[0, :100])]))
        assert rt.started.wait(10)
        own = pool.submit(stub.Forecast, pb.ForecastRequest(model="taylor", series=[matrix(x[0])]))
        theirs = pool.submit(kserve.ModelInfer, request(x))
        wait_for(lambda: mv.batcher.queued_rows >= 2 * 432)
        rt.gate.set()
        first.result(10)
        np.testing.assert_array_equal(outputs(theirs.result(10))["y"][0], array(own.result(10).forecasts[0]))
    assert (2, 432) in rt.runs, rt.runs  # both windows in one onnxruntime run


def test_kserve_calls_are_counted_from_zero(srv: RunningServer, kserve: kpb_grpc.GRPCInferenceServiceStub) -> None:
    registry = srv.app.metrics.registry

    def count(model: str, code: str) -> float | None:
        return registry.get_sample_value("gatecast_requests_total", {"rpc": "ModelInfer", "model": model, "code": code})

    assert count("qsum", "DEADLINE_EXCEEDED") == 0  # the series exists from the model's load: rate() sees its first
    ok, missing = count("taylor", "OK"), count("", "NOT_FOUND")
    assert ok is not None and missing is not None
    kserve.ModelInfer(request(windows(batch=1)))
    with pytest.raises(grpc.RpcError):
        kserve.ModelInfer(request(windows(batch=1), model="nope"))
    assert (count("taylor", "OK"), count("", "NOT_FOUND")) == (ok + 1, missing + 1)


# --- what a client gets wrong ------------------------------------------------------------------------------


def _mutate(req: kpb.ModelInferRequest, change: str) -> None:
    x = req.inputs[0]
    if change == "no input":
        del req.inputs[:]
        del req.raw_input_contents[:]
    elif change == "state input":
        x.name = "h0"
    elif change == "FP64":
        x.datatype = "FP64"
    elif change == "2-d shape":
        del x.shape[:]
        x.shape.extend([432, 1])
    elif change == "two features":
        x.shape[2] = 2
    elif change == "zero batch":
        x.shape[0] = 0
    elif change == "short raw":
        req.raw_input_contents[0] = req.raw_input_contents[0][:-2]
    elif change == "raw and typed":
        x.contents.fp32_contents.append(1.0)
    elif change == "two raw":
        req.raw_input_contents.append(b"\0\0\0\0")
    elif change == "int contents":
        del req.raw_input_contents[:]
        x.contents.int_contents.extend([1] * 864)
    elif change == "NaN":
        data = np.frombuffer(req.raw_input_contents[0], "<f4").copy()
        data[432 + 5] = np.nan
        req.raw_input_contents[0] = data.tobytes()
    elif change == "state output":
        req.outputs.add(name="hn")
    elif change == "output twice":
        req.outputs.add(name="y")
        req.outputs.add(name="y")
    elif change == "sequence":
        req.parameters["sequence_id"].int64_param = 5
    elif change == "version word":
        req.model_version = "latest"
    elif change == "unknown version":
        req.model_version = "3"
    elif change == "unknown model":
        req.model_name = "nope"
    elif change == "long name":
        req.model_name = "n" * 5000


ERRORS = [
    ("no input", "INVALID_ARGUMENT", "0 input tensors (none); model taylor takes one, 'x' FP32 [batch, time, 1]"),
    ("state input", "INVALID_ARGUMENT", "input 'h0' is not an input of model taylor; expected 'x' FP32"),
    ("FP64", "INVALID_ARGUMENT", "input 'x': datatype 'FP64'; expected FP32"),
    ("2-d shape", "INVALID_ARGUMENT", "input 'x': shape [432, 1]; expected [batch, time, 1]"),
    ("two features", "INVALID_ARGUMENT", "input 'x': shape [2, 432, 2]; expected [batch, time, 1]"),
    ("zero batch", "INVALID_ARGUMENT", "shape [0, 432, 1]; expected [batch, time, 1] (batch and time at least 1"),
    ("short raw", "INVALID_ARGUMENT", "3454 bytes of raw contents for shape [2, 432, 1]; expected 3456 (864 FP32"),
    ("raw and typed", "INVALID_ARGUMENT", "input 'x' has fp32_contents beside raw_input_contents"),
    ("two raw", "INVALID_ARGUMENT", "2 raw_input_contents for 1 input; expected one per input"),
    ("int contents", "INVALID_ARGUMENT", "input 'x': values in int_contents; FP32 values travel in fp32_contents"),
    ("NaN", "INVALID_ARGUMENT", "input 'x': series 1, row 5 holds NaN or infinity"),
    ("state output", "INVALID_ARGUMENT", "output 'hn' is not an output of model taylor; it has ['y']. ModelInfer runs"),
    ("output twice", "INVALID_ARGUMENT", "output 'y' is requested twice"),
    ("sequence", "INVALID_ARGUMENT", "sequence parameters (sequence_id, sequence_start, sequence_end)"),
    ("version word", "INVALID_ARGUMENT", "model version 'latest' is not a version number; expected a positive integer"),
    ("unknown version", "NOT_FOUND", "model 'taylor' has no version 3; loaded versions: [1]"),
    ("unknown model", "NOT_FOUND", "model 'nope' not found; loaded models: qsum, taylor"),
    ("long name", "NOT_FOUND", "... (5000 characters) not found: model names are at most 64 characters"),
]


@pytest.mark.parametrize(("change", "code", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_infer_requests_are_refused_with_what_was_expected(
    kserve: kpb_grpc.GRPCInferenceServiceStub, change: str, code: str, message: str
) -> None:
    req = request(windows())
    _mutate(req, change)
    with pytest.raises(grpc.RpcError) as e:
        kserve.ModelInfer(req, timeout=10)
    assert (e.value.code().name, message in str(e.value.details())) == (code, True), e.value.details()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([9, 1, 1], "input 'x': batch 9; at most 8 series are accepted"),
        ([1, 1001, 1], "input 'x': time 1001; at most 1000 rows are accepted per series"),
        ([3, 800, 1], "2400 rows in one request (summed over its series); at most 2000 are accepted"),
    ],
)
def test_requests_beyond_the_servers_limits_are_refused(
    kserve: kpb_grpc.GRPCInferenceServiceStub, shape: list[int], message: str
) -> None:
    req = request(np.ones(shape, np.float32))
    with pytest.raises(grpc.RpcError) as e:
        kserve.ModelInfer(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in str(e.value.details()), e.value.details()


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"])
def test_malformed_bytes_are_invalid_argument_and_the_server_goes_on(srv: RunningServer, data: bytes) -> None:
    with grpc.insecure_channel(srv.address) as ch:
        call = ch.unary_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(data, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in str(e.value.details())
        # the .proto a KServe client is generated from, not gatecast's own
        assert "against proto/inference/grpc_predict_v2.proto" in str(e.value.details()), e.value.details()
        reply = kpb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request(windows(batch=1)), timeout=10)
        assert outputs(reply)["y"].shape == (1, 48, 1)


def test_generated_kserve_code_is_fresh(tmp_path: Path) -> None:
    from gatecast.codegen import generate

    generate(tmp_path)
    produced = sorted((tmp_path / "gatecast" / "inference").iterdir())
    assert [p.name for p in produced] == sorted(p.name for p in (ROOT / "gatecast" / "inference").glob("*_pb2*"))
    for p in produced:
        committed = ROOT / "gatecast" / "inference" / p.name
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run `make proto`"


# --- an unchanged KServe client: NVIDIA's tritonclient ------------------------------------------------------


def tritonclient_python() -> Path:
    """Python of a virtual environment holding tritonclient[grpc]; created once per machine (a minute, from
    the package index), kept under the user's cache folder and reused."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gatecast"
    venv = cache / f"tritonclient-{TRITONCLIENT}-py{sys.version_info.major}{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        building = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
        pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", f"tritonclient[grpc]=={TRITONCLIENT}"]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"installing tritonclient failed:\n{done.stderr[-3000:]}"
        if not python.exists():  # another run may have finished first
            building.rename(venv)
    return python


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return tritonclient_python()


@pytest.mark.timeout(900)  # the first run installs tritonclient
def test_tritonclient_works_unchanged(srv: RunningServer, triton_python: Path, tmp_path: Path) -> None:
    x = windows(batch=2)
    qx = np.array([[[1.0], [2.0], [4.0]]], np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", qx)
    script = ROOT / "tests" / "kserve_client.py"
    done = subprocess.run(
        [str(triton_python), str(script), srv.address, str(tmp_path / "x.npy"), str(tmp_path / "q.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # nothing of the checkout on its path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert (got["live"], got["ready"], got["model_ready"], got["version_ready"]) == (True, True, True, True)
    assert (got["unknown_version_ready"], got["unknown_model_ready"]) == (False, False)
    assert got["server"]["name"] == "gatecast"
    meta = got["metadata"]
    assert (meta["name"], meta["versions"], meta["platform"]) == ("taylor", ["1"], "onnx_onnxv1")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1", "1"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "48", "1"]}]
    assert [o["name"] for o in got["quantile_metadata"]["outputs"]] == ["y", "q"]
    y = np.array(got["y"], np.float32)
    assert y.shape == (2, 48, 1)
    np.testing.assert_allclose(y, forecast(srv, x), rtol=1e-6, atol=1e-3)
    assert (got["response"]["model_name"], got["response"]["model_version"], got["response"]["id"]) == (
        "taylor",
        "1",
        "req-7",
    )
    assert got["q_outputs"] == ["q"]
    np.testing.assert_allclose(np.array(got["q"])[0, 0, 0], [7 * (1 + q) for q in LEVELS], rtol=1e-6)
    assert got["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "shape [432, 1]; expected [batch, time, 1]" in got["bad_shape"]["message"]
    assert got["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert got["unknown_metadata"]["status"] == "StatusCode.NOT_FOUND"
