"""Protobuf <-> numpy at the edge of the server, with the checks that make bad input a clear error."""

from __future__ import annotations

import re

import numpy as np

from gatecast.v1 import forecaster_pb2 as pb

from .errors import InvalidArgument

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
    x = np.array(m.values, dtype=np.float32).reshape(m.rows, m.cols)
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise InvalidArgument(f"{what}: row {row} holds NaN or infinity; expected finite numbers")
    return x


def to_matrix(y: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=y.shape[0], cols=y.shape[1], values=y.ravel().tolist())


def to_quantile_matrix(q: np.ndarray) -> pb.Matrix:
    """q [horizon, targets, quantiles] as rows = horizon, cols = targets * quantiles, target-major."""
    h, t, n = q.shape
    return pb.Matrix(rows=h, cols=t * n, values=q.ravel().tolist())


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
