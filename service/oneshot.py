"""A one-shot Forecast's checks and answer, shared by the main process and the forecast workers
(service.forecast_pool), so both refuse the same requests with the same words and answer the same bytes.

`forecast_head` reads a ForecastRequest's model name and version from its wire form without decoding the
series, for the main process to resolve the model before handing the bytes to a worker."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gatecast.manifest import Manifest
from gatecast.v1 import forecaster_pb2 as pb

from .batcher import Batcher, Output
from .convert import to_array, to_matrix, to_quantile_matrix
from .errors import InvalidArgument
from .settings import Settings


def forecast_inputs(
    request: pb.ForecastRequest, manifest: Manifest, batcher: Batcher, settings: Settings
) -> list[np.ndarray]:
    """The request's series as float32 arrays [rows, features], once every check has passed."""
    if not request.series:
        raise InvalidArgument("no series given; expected one or more histories (rows x features)")
    if len(request.series) > settings.max_series:
        raise InvalidArgument(
            f"{len(request.series)} series in one request; at most {settings.max_series} are accepted"
        )
    batcher.check_request_rows(sum(s.rows for s in request.series))  # before converting anything
    n_f = manifest.n_features
    return [to_array(s, n_f, f"series[{i}]", settings.max_rows) for i, s in enumerate(request.series)]


def forecast_response(manifest: Manifest, outs: Sequence[Output]) -> pb.ForecastResponse:
    response = pb.ForecastResponse(
        model=manifest.name,
        version=manifest.version,
        forecasts=[to_matrix(o.y) for o in outs],
        quantiles=manifest.quantiles,
    )
    if manifest.onnx.quantile_output:
        response.quantile_forecasts.extend(to_quantile_matrix(o.q) for o in outs if o.q is not None)
    return response


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i] and the index after it; raises IndexError when cut short."""
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def forecast_head(data: bytes) -> tuple[str, int] | None:
    """(model, version) as protobuf would decode them from a ForecastRequest's bytes, or None when the bytes
    hold anything but fields 1 (a string), 2 (a 32-bit varint) and 3 (length-delimited) laid out whole:
    such a request is decoded by protobuf in the main process, which says what is wrong with it. The
    series' contents are not looked at here (a worker decodes them)."""
    model = b""
    version = 0
    i, end = 0, len(data)
    try:
        while i < end:
            tag = data[i]
            if tag == 0x1A or tag == 0x0A:  # series (3) or model (1): length-delimited
                n, j = _varint(data, i + 1)
                if j + n > end:
                    return None
                if tag == 0x0A:
                    model = data[j : j + n]
                i = j + n
            elif tag == 0x10:  # version (2)
                version, i = _varint(data, i + 1)
                if version >= 1 << 32:
                    return None
            else:
                return None
    except IndexError:
        return None
    try:
        return model.decode(), version
    except UnicodeDecodeError:
        return None
