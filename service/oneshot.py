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
from .convert import _head, _values, to_array, to_matrix, to_quantile_matrix
from .convert import _varint as _varint_bytes
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
                if tag == 0x0A:  # every copy must be UTF-8, as protobuf checks; the last one counts
                    model = data[j : j + n]
                    model.decode()
                i = j + n
            elif tag == 0x10:  # version (2)
                version, i = _varint(data, i + 1)
                if version >= 1 << 32:
                    return None
            else:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return model.decode(), version


def forecast_series(
    data: bytes, n_features: int, max_series: int, max_rows: int, max_request_rows: int
) -> list[np.ndarray] | None:
    """What `forecast_inputs` returns for a ForecastRequest's bytes, read from the wire form without
    protobuf, when the request holds fields 1, 2 and 3 laid out whole, each series' fields are rows (1),
    cols (2) and packed values (3), each once, and every check passes; None otherwise (protobuf and
    `forecast_inputs` then decode and check it, and refuse it with their words). The arrays are the bytes'
    float32 values, as protobuf reads them."""
    xs: list[np.ndarray] = []
    i, end = 0, len(data)
    total = 0
    try:
        while i < end:
            tag = data[i]
            if tag == 0x10:  # version
                _, i = _varint(data, i + 1)
                continue
            if tag != 0x1A and tag != 0x0A:
                return None
            n, j = _varint(data, i + 1)
            stop = j + n
            if stop > end:
                return None
            i = stop
            if tag == 0x0A:  # model: protobuf refuses a copy that is not UTF-8
                data[j:stop].decode()
                continue
            rows = cols = 0
            at = -1  # where the values start
            count = 0
            seen = 0
            while j < stop:
                t = data[j]
                if t == 0x08 and not seen & 1:
                    rows, j = _varint(data, j + 1)
                    seen |= 1
                elif t == 0x10 and not seen & 2:
                    cols, j = _varint(data, j + 1)
                    seen |= 2
                elif t == 0x1A and not seen & 4:
                    count, at = _varint(data, j + 1)
                    j = at + count
                    seen |= 4
                else:
                    return None
            if j != stop or not 0 < rows <= max_rows or cols != n_features or count != 4 * rows * cols:
                return None
            total += rows
            if len(xs) >= max_series or total > max_request_rows:
                return None
            x = np.frombuffer(data, "<f4", rows * cols, at).reshape(rows, cols)
            xs.append(x)
    except (IndexError, UnicodeDecodeError):
        return None
    if not xs or not all(np.isfinite(x).all() for x in xs):
        return None
    return xs


def _field(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _varint_bytes(len(body)) + body


def _matrix_bytes(rows: int, cols: int, values: np.ndarray) -> bytes:
    data = np.ascontiguousarray(values, "<f4").tobytes()
    head = (b"\x08" + _varint_bytes(rows) if rows else b"") + (b"\x10" + _varint_bytes(cols) if cols else b"")
    return head + (_field(0x1A, data) if data else b"")


def forecast_response_bytes(manifest: Manifest, outs: Sequence[Output]) -> bytes:
    """`forecast_response(manifest, outs).SerializeToString()`, written directly: protobuf writes fields in
    number order, leaves out zero scalars and empty repeated fields, and packs repeated floats."""
    parts = [_model_fields(manifest.name, manifest.version)]
    parts += [_field(0x1A, _matrix_bytes(o.y.shape[0], o.y.shape[1], o.y)) for o in outs]
    if manifest.quantiles:
        parts.append(_field(0x22, np.asarray(manifest.quantiles, "<f4").tobytes()))
    if manifest.onnx.quantile_output:
        for o in outs:
            if o.q is not None:
                h, t, n = o.q.shape
                parts.append(_field(0x2A, _matrix_bytes(h, t * n, o.q)))
    return b"".join(parts)


def _model_fields(model: str, version: int) -> bytes:
    """A ForecastRequest's or ForecastResponse's model (1) and version (2) fields, as protobuf writes them."""
    name = model.encode()
    return (_field(0x0A, name) if name else b"") + (b"\x10" + _varint_bytes(version) if version else b"")


def _matrix_field_head(tag: int, rows: int, cols: int) -> bytes:
    """A field `tag` holding a Matrix of rows x cols (each at least 1), up to its values."""
    head = _head(rows, cols, rows * cols)
    return bytes((tag,)) + _varint_bytes(len(head) + 4 * rows * cols) + head


def _matrix_fields(tag: int, a: np.ndarray) -> bytes:
    """Fields `tag` holding one Matrix each, for a [batch, rows, cols] array (rows and cols at least 1): every
    field's bytes up to its values are the same, so all are written as one array, not one piece each."""
    batch, rows, cols = a.shape
    head = _matrix_field_head(tag, rows, cols)
    records = np.empty((batch, len(head) + 4 * rows * cols), np.uint8)
    records[:, : len(head)] = np.frombuffer(head, np.uint8)
    records[:, len(head) :] = np.ascontiguousarray(a, "<f4").reshape(batch, -1).view(np.uint8)
    return records.tobytes()


def forecast_request_bytes(model: str, version: int, windows: np.ndarray) -> bytes:
    """The wire form of a ForecastRequest for `windows` [batch, time, features] of `model` `version`, one
    series each: what a forecast worker takes (KServe's ModelInfer is a Forecast in tensor form)."""
    return _model_fields(model, version) + _matrix_fields(0x1A, windows)


def forecast_arrays(data: bytes, manifest: Manifest, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The `n` series of a ForecastResponse's wire form as arrays: the forecasts [n, horizon, targets] and, for
    a quantile model, the quantile forecasts [n, horizon, targets, quantiles] (else None). The answer of a
    worker is read as `forecast_response_bytes` lays it out, as arrays at known offsets; any other layout is
    decoded by protobuf."""
    h, t = manifest.horizon, manifest.n_targets
    nq = len(manifest.quantiles)
    parts: list[tuple[int, int]] = [(0x1A, t)]  # (tag, columns) of each block of n matrices of h rows
    if manifest.onnx.quantile_output:
        parts.append((0x2A, t * nq))
    quantiles = _field(0x22, np.asarray(manifest.quantiles, "<f4").tobytes()) if manifest.quantiles else b""
    at = len(prefix := _model_fields(manifest.name, manifest.version))
    blocks: list[np.ndarray] = []
    readable = data.startswith(prefix)
    for k, (tag, cols) in enumerate(parts):
        head = _matrix_field_head(tag, h, cols)
        size = len(head) + 4 * h * cols
        if not readable or len(data) < at + n * size:
            readable = False
            break
        records = np.frombuffer(data, np.uint8, n * size, at).reshape(n, size)
        if not (records[:, : len(head)] == np.frombuffer(head, np.uint8)).all():
            readable = False
            break
        blocks.append(records[:, len(head) :].copy().view("<f4").reshape(n, h, cols))
        at += n * size
        if k == 0 and quantiles:  # the quantile levels, after the forecasts
            readable = data.startswith(quantiles, at)
            at += len(quantiles)
    if readable and at == len(data):  # "<f4" is float32 on the little-endian machines this runs on
        return blocks[0], blocks[1].reshape(n, h, t, nq) if len(blocks) > 1 else None
    response = pb.ForecastResponse.FromString(data)
    y = np.stack([_values(m).reshape(h, t) for m in response.forecasts])
    if not manifest.onnx.quantile_output:
        return y, None
    return y, np.stack([_values(m).reshape(h, t, nq) for m in response.quantile_forecasts])
