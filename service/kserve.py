"""The KServe v2 / Open Inference Protocol front, on gatecast's port beside its own API.

A gatecast model is a KServe model of the same name; its version is the gatecast version as a decimal
string (empty: the default, highest loaded version). ModelInfer is Forecast in tensor form: the input
(named as the graph's window input, FP32 [batch, time, features]) holds one series per batch row, each run
from a zero state as a Forecast of those series runs: in a forecast worker that holds the version (the
request handed over as a Forecast's bytes, service.forecast_pool), else by the same batcher as Forecast in
this process. Either way KServe and Forecast requests share model runs and get the same answers. The
outputs are the point forecast [batch, horizon, targets] and, for a quantile model, the quantile output
[batch, horizon, targets, quantiles], answered as raw little-endian bytes (what tritonclient reads).
Recurrent state is neither taken nor returned: sessions are gatecast's own API.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

import grpc
import numpy as np

import gatecast
from gatecast.inference import grpc_predict_v2_pb2 as kpb
from gatecast.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from gatecast.manifest import Manifest

from .convert import quote
from .errors import InvalidArgument, NotFound, ServiceError
from .forecast_pool import ForecastPool
from .metrics import Metrics
from .oneshot import forecast_arrays, forecast_request_bytes
from .repository import ModelVersion, Repository
from .servicer import Front, _Call, _deadline
from .settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnx_onnxv1"  # the specification's name for an ONNX model run by onnxruntime
FP32 = "FP32"
MAX_NAME = 64  # the manifest's limit on a model name
_VERSION = re.compile(r"^[0-9]{1,9}$")
# tritonclient's parameters for Triton's sequence batcher: carried state, which ModelInfer does not keep
_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")
NO_STATE = "ModelInfer runs from a zero state and keeps none; gatecast's OpenSession/Observe carry state"

T = TypeVar("T")


def parse_version(text: str) -> int:
    """A KServe version string as a gatecast version; 0 (the default version) for an empty one."""
    if not text:
        return 0
    if not _VERSION.match(text) or int(text) == 0:
        raise InvalidArgument(
            f"model version {quote(text)} is not a version number; expected a positive integer, or empty for "
            "the default (highest loaded) version"
        )
    return int(text)


def output_shapes(m: Manifest) -> dict[str, list[int]]:
    """The outputs ModelInfer answers, by name, with their shapes (-1: the batch)."""
    shapes = {m.onnx.output: [-1, m.horizon, m.n_targets]}
    if m.onnx.quantile_output:
        shapes[m.onnx.quantile_output] = [-1, m.horizon, m.n_targets, len(m.quantiles)]
    return shapes


def _expected_input(m: Manifest) -> str:
    return f"{m.onnx.input!r} {FP32} [batch, time, {m.n_features}]"


def _state_names(m: Manifest) -> set[str]:
    return {name for s in m.states for name in (s.input, s.output)}


def read_input(req: kpb.ModelInferRequest, mv: ModelVersion, settings: Settings) -> np.ndarray:
    """The request's one input tensor as float32 [batch, time, features], checked against the model and
    the server's limits before any value is read; raw contents and typed fp32 contents both accepted,
    never both."""
    m = mv.runtime.manifest
    if len(req.inputs) != 1:
        given = ", ".join(quote(t.name, 32) for t in req.inputs[:4]) or "none"
        raise InvalidArgument(
            f"{len(req.inputs)} input tensors ({given}); model {m.name} takes one, {_expected_input(m)}. {NO_STATE}"
        )
    t = req.inputs[0]
    if t.name != m.onnx.input:
        hint = f". {NO_STATE}" if t.name in _state_names(m) else ""
        raise InvalidArgument(
            f"input {quote(t.name, 32)} is not an input of model {m.name}; expected {_expected_input(m)}{hint}"
        )
    name = repr(t.name)
    if t.datatype != FP32:
        raise InvalidArgument(f"input {name}: datatype {quote(t.datatype, 16)}; expected {FP32}")
    shape = list(t.shape)
    if len(shape) != 3 or shape[2] != m.n_features or min(shape) < 1:
        raise InvalidArgument(
            f"input {name}: shape {shape[:8]}; expected [batch, time, {m.n_features}] (batch and time at least 1, "
            f"{m.n_features} feature(s) per row; the model was trained on windows of {m.context_length} rows)"
        )
    batch, rows, n_f = shape
    if batch > settings.max_series:
        raise InvalidArgument(f"input {name}: batch {batch}; at most {settings.max_series} series are accepted")
    if rows > settings.max_rows:
        raise InvalidArgument(f"input {name}: time {rows}; at most {settings.max_rows} rows are accepted per series")
    mv.batcher.check_request_rows(batch * rows)
    count = batch * rows * n_f
    typed = [f.name for f, _ in t.contents.ListFields()]
    if req.raw_input_contents:
        if typed:
            raise InvalidArgument(
                f"input {name} has {typed[0]} beside raw_input_contents; send the values in one of the two"
            )
        if len(req.raw_input_contents) != 1:
            raise InvalidArgument(
                f"{len(req.raw_input_contents)} raw_input_contents for 1 input; expected one per input"
            )
        data = req.raw_input_contents[0]
        if len(data) != 4 * count:
            raise InvalidArgument(
                f"input {name}: {len(data)} bytes of raw contents for shape {shape}; expected {4 * count} "
                f"({count} {FP32} values, little-endian)"
            )
        x = np.frombuffer(data, "<f4").astype(np.float32)
    else:
        if any(f != "fp32_contents" for f in typed):
            other = next(f for f in typed if f != "fp32_contents")
            raise InvalidArgument(f"input {name}: values in {other}; {FP32} values travel in fp32_contents or raw")
        values = t.contents.fp32_contents
        if len(values) != count:
            raise InvalidArgument(
                f"input {name}: {len(values)} values in fp32_contents for shape {shape}; expected {count}"
            )
        x = np.array(values, np.float32)
    x = x.reshape(batch, rows, n_f)
    if np.count_nonzero(np.isfinite(x)) < x.size:  # a count first: a third of the time of locating one
        series, row = (int(i) for i in np.argwhere(~np.isfinite(x).all(axis=2))[0])
        raise InvalidArgument(
            f"input {name}: series {series}, row {row} holds NaN or infinity; expected finite numbers"
        )
    return x


def wanted_outputs(req: kpb.ModelInferRequest, m: Manifest) -> list[str]:
    """The outputs to answer, in the order asked (all of them when none is named)."""
    available = list(output_shapes(m))
    if not req.outputs:
        return available
    names: list[str] = []
    for out in req.outputs:
        if out.name not in available:
            hint = f". {NO_STATE}" if out.name in _state_names(m) else ""
            raise InvalidArgument(
                f"output {quote(out.name, 32)} is not an output of model {m.name}; it has {available}{hint}"
            )
        if out.name in names:
            raise InvalidArgument(f"output {out.name!r} is requested twice")
        if "classification" in out.parameters:
            raise InvalidArgument(f"output {out.name!r}: classification is not supported; forecasts are numbers")
        names.append(out.name)
    return names


class KServeServicer(Front, kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, settings: Settings, repo: Repository, metrics: Metrics, forecasts: ForecastPool | None = None
    ) -> None:
        super().__init__(metrics)  # counting, timing and error mapping as gatecast's own API does them
        self.settings = settings
        self.repo = repo
        self.forecasts = forecasts  # the forecast workers, when there are any
        self._in_process = metrics.forecast_path.labels("process")

    def _resolve(self, name: str, version: str) -> ModelVersion:
        if len(name) > MAX_NAME:
            raise NotFound(f"model {quote(name, MAX_NAME)} not found: model names are at most {MAX_NAME} characters")
        return self.repo.resolve(name, parse_version(version))

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ServerLiveResponse:
            return kpb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, handle)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ServerReadyResponse:
            return kpb.ServerReadyResponse(ready=bool(self.repo.versions()))  # as the health service says

        return await self._call("ServerReady", context, handle)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ModelReadyResponse:
            try:
                call.model = self._resolve(request.name, request.version).name
            except ServiceError:
                return kpb.ModelReadyResponse(ready=False)
            return kpb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, handle)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ServerMetadataResponse:
            return kpb.ServerMetadataResponse(name="gatecast", version=gatecast.__version__)

        return await self._call("ServerMetadata", context, handle)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ModelMetadataResponse:
            mv = self._resolve(request.name, request.version)
            call.model = mv.name
            m = mv.runtime.manifest
            tensor = kpb.ModelMetadataResponse.TensorMetadata
            return kpb.ModelMetadataResponse(
                name=mv.name,
                versions=[str(v.version) for v in self.repo.versions() if v.name == mv.name],
                platform=PLATFORM,
                inputs=[tensor(name=m.onnx.input, datatype=FP32, shape=[-1, -1, m.n_features])],
                outputs=[tensor(name=n, datatype=FP32, shape=s) for n, s in output_shapes(m).items()],
            )

        return await self._call("ModelMetadata", context, handle)

    async def ModelInfer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        async def handle(call: _Call) -> kpb.ModelInferResponse:
            mv = self._resolve(request.model_name, request.model_version)
            call.model = mv.name
            m = mv.runtime.manifest
            if any(p in request.parameters for p in _SEQUENCE):
                raise InvalidArgument(f"sequence parameters ({', '.join(_SEQUENCE)}) are not supported: {NO_STATE}")
            x = read_input(request, mv, self.settings)
            names = wanted_outputs(request, m)
            y, q = await self._forecast(mv, x, _deadline(context))
            tensors = {m.onnx.output: y}
            if m.onnx.quantile_output:
                assert q is not None
                tensors[m.onnx.quantile_output] = q
            response = kpb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request.id)
            for name in names:
                t = tensors[name]
                response.outputs.add(name=name, datatype=FP32, shape=t.shape)
                response.raw_output_contents.append(t.astype("<f4", copy=False).tobytes())
            return response

        return await self._call("ModelInfer", context, handle)

    async def _forecast(
        self, mv: ModelVersion, x: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The forecasts of windows x [batch, time, features] and, for a quantile model, the quantiles: from a
        forecast worker that holds the version, else run here (as `Forecast` chooses)."""
        if self.forecasts is not None:
            m = mv.runtime.manifest
            answer = await self.forecasts.forecast(mv, forecast_request_bytes(m.name, m.version, x), deadline)
            if answer is not None:
                return forecast_arrays(answer, m, len(x))
        self._in_process.inc()
        outs = await mv.batcher.forecast(list(x), deadline)
        q = [o.q for o in outs if o.q is not None]
        return np.stack([o.y for o in outs]), np.stack(q) if q else None


def add_to_server(servicer: KServeServicer, server: Any) -> None:
    """Malformed request bytes are refused with INVALID_ARGUMENT by the server's TolerantDecoding
    interceptor, as for health and reflection."""
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
