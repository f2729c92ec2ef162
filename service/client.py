"""`gatecast forecast`: a small client that reads a CSV, asks the server, and prints the forecast."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import grpc
import numpy as np

from gatecast.errors import UserError
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc


class ClientError(UserError):
    pass


def read_columns(path: Path, columns: list[str]) -> np.ndarray:
    """The named columns of a CSV as float32 [rows, columns]; errors name the column and row."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ClientError(f"{path}: no column(s) {missing}; the model needs {columns}, the file has {header}")
        rows = []
        for n, row in enumerate(reader, start=2):
            try:
                rows.append([float(row[c]) for c in columns])
            except (TypeError, ValueError):
                bad = next(c for c in columns if not _is_float(row[c]))
                raise ClientError(f"{path}: column {bad!r}, row {n}: {row[bad]!r} is not a number") from None
    if not rows:
        raise ClientError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float32)


def _is_float(s: str | None) -> bool:
    try:
        float(s)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def forecast_cli(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.server) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        try:
            info = stub.GetModel(pb.GetModelRequest(name=args.model, version=args.version), timeout=args.timeout)
            x = read_columns(args.data, list(info.features))
            x = x[-(args.rows or info.context_length) :]
            series = pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())
            reply = stub.Forecast(
                pb.ForecastRequest(model=args.model, version=args.version, series=[series]), timeout=args.timeout
            )
        except grpc.RpcError as e:
            raise ClientError(f"{args.server}: {e.code().name}: {e.details()}") from None
    m = reply.forecasts[0]
    y = np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)
    if args.format == "json":
        out = {"model": reply.model, "version": reply.version, "targets": list(info.targets), "forecast": y.tolist()}
        print(json.dumps(out))
    else:
        print(f"{reply.model} v{reply.version}: {m.rows} steps ahead from the last {x.shape[0]} rows of {args.data}")
        print(f"{'step':>5}  " + "  ".join(f"{t:>14}" for t in info.targets))
        for i, row in enumerate(y, start=1):
            print(f"{i:>5}  " + "  ".join(f"{v:>14.3f}" for v in row))
    return 0
