"""Protobuf <-> numpy at the edge of the server, with the checks that make bad input a clear error."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from gatecast.v1 import forecaster_pb2 as pb

from .errors import InvalidArgument, MalformedRequest

_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


def to_array(m: pb.Matrix, n_features: int, what: str, max_rows: int) -> np.ndarray:
    """A Matrix as float32 [rows, cols], checked against the model's feature count."""
    if m.rows == 0:
        given = f" but {len(m.values)} values" if m.values else ""
        raise InvalidArgument(f"{what}: no rows{given}; expected at least one row of {n_features} feature(s)")
    if m.cols != n_features:
        raise InvalidArgument(f"{what}: {m.cols} column(s); the model expects {n_features} feature(s) per row")
    if m.rows > max_rows:
        raise InvalidArgument(f"{what}: {m.rows} rows; at most {max_rows} are accepted in one message")
    if len(m.values) != m.rows * m.cols:
        raise InvalidArgument(
            f"{what}: {len(m.values)} values for a {m.rows} x {m.cols} matrix; expected {m.rows * m.cols}"
        )
    x = _values(m).reshape(m.rows, m.cols)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise InvalidArgument(f"{what}: row {row} holds NaN or infinity; expected finite numbers")
    return x


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@lru_cache(maxsize=1024)  # a server sees few distinct shapes
def _head(rows: int, cols: int, n_values: int) -> bytes:
    """A Matrix's wire form up to its values: rows (field 1), cols (2), the packed values' tag and length (3);
    proto3 leaves out fields that are 0."""
    head = (b"\x08" + _varint(rows) if rows else b"") + (b"\x10" + _varint(cols) if cols else b"")
    return head + (b"\x1a" + _varint(4 * n_values) if n_values else b"")


def _values(m: pb.Matrix) -> np.ndarray:
    """The values as float32, read as one block from the message's wire form (packed little-endian floats)
    instead of one Python float at a time; any other layout (unknown fields) takes the slow path."""
    n = len(m.values)
    head = _head(m.rows, m.cols, n)
    wire = m.SerializeToString()
    if len(wire) == len(head) + 4 * n and wire.startswith(head):
        return np.frombuffer(wire, "<f4", n, len(head)).astype(np.float32, copy=False)
    return np.array(m.values, dtype=np.float32)


def _matrix(rows: int, cols: int, values: np.ndarray) -> pb.Matrix:
    """A Matrix parsed from its wire form: the values are copied as one block, not as a list of floats."""
    data = np.ascontiguousarray(values, "<f4").tobytes()
    return pb.Matrix.FromString(_head(rows, cols, len(data) // 4) + data)


def to_matrix(y: np.ndarray) -> pb.Matrix:
    return _matrix(y.shape[0], y.shape[1], y)


def to_quantile_matrix(q: np.ndarray) -> pb.Matrix:
    """q [horizon, targets, quantiles] as rows = horizon, cols = targets * quantiles, target-major."""
    h, t, n = q.shape
    return _matrix(h, t * n, q)


def quote(text: str, limit: int = 64) -> str:
    """A client's string for an error message: quoted, and shortened when long (never echoed whole)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_session_id(session_id: str) -> str:
    if not _SESSION_ID.match(session_id):
        raise InvalidArgument(
            f"session_id {quote(session_id)} is malformed; expected the 32 hex characters OpenSession returned"
        )
    return session_id


# the .proto a client's code is generated from, by the package of the request's type (the others: health and
# reflection, grpc's own)
_PROTOS = (
    ("gatecast.v1.", "proto/gatecast/v1/forecaster.proto"),
    ("inference.", "proto/inference/grpc_predict_v2.proto"),
)


class Malformed:
    """A request whose bytes did not decode."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def problem(self) -> MalformedRequest:
        where = next((f for prefix, f in _PROTOS if self.type_name.startswith(prefix)), "the service's .proto file")
        return MalformedRequest(
            f"the request is not a valid {self.type_name} message ({quote(self.error, 120)}); "
            f"check the client's generated code against {where}"
        )
