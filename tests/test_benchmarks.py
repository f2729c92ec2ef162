"""The benchmark clients' wire helpers (benchmarks/bytes_client.py, benchmarks/stream_batch.py) against
protobuf's own encoding: a client that miscounts errors would report figures for answers that were never
good."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bytes_client import observe_bytes, stream_error
from benchmarks.stream_batch import BatchSteps, batch_bytes, batch_counts
from gatecast.v1 import forecaster_pb2 as pb

ROW = pb.Matrix(rows=1, cols=1, values=[1.5])
FORECAST = pb.Matrix(rows=24, cols=1, values=np.arange(24, dtype=np.float32).tolist())
IDS = [f"{i:032x}" for i in range(64)]


def _ok(seq: int, ids: list[str] = IDS) -> bytes:
    results = [pb.StreamResponse(session_id=s, sequence=seq, forecast=FORECAST) for s in ids]
    return pb.ObserveBatchResponse(results=results).SerializeToString()


def _error(sid: str, seq: int) -> pb.StreamResponse:
    return pb.StreamResponse(session_id=sid, sequence=seq, error=pb.StreamError(code=9, message="out of order"))


@pytest.mark.parametrize("seq", [1, 127, 128, 16_384, 3_000_000])
def test_batch_message_is_protobufs_encoding(seq: int) -> None:
    steps = [pb.ObserveRequest(session_id=s, sequence=seq, rows=ROW) for s in IDS]
    want = pb.ObserveBatchRequest(steps=steps).SerializeToString()
    assert BatchSteps(IDS, ROW.SerializeToString()).message(seq) == want
    assert batch_bytes(IDS, seq, ROW.SerializeToString()) == want
    one = pb.ObserveRequest(session_id=IDS[0], sequence=seq, rows=ROW).SerializeToString()
    assert observe_bytes(IDS[0], seq, ROW.SerializeToString()) == one


@pytest.mark.parametrize("seq", [1, 200, 3_000_000])
def test_batch_answer_counts_every_steps_error(seq: int) -> None:
    b = BatchSteps(IDS, ROW.SerializeToString())
    assert b.forecasts(_ok(seq), seq) == 64
    results = [
        _error(s, seq) if i % 3 == 0 else pb.StreamResponse(session_id=s, sequence=seq, forecast=FORECAST)
        for i, s in enumerate(IDS)
    ]
    mixed = pb.ObserveBatchResponse(results=results).SerializeToString()
    assert b.forecasts(mixed, seq) == 42 and batch_counts(mixed) == (42, 22)
    refused = pb.ObserveBatchResponse(error=pb.StreamError(code=3, message="too many steps")).SerializeToString()
    assert b.forecasts(refused, seq) == 0 and batch_counts(refused) == (0, 1)
    assert b.forecasts(_ok(seq)[:-3], seq) == 63  # the last result cut short is not a forecast
    assert b.forecasts(_ok(seq, IDS[:63]), seq) == 63  # a missing result is not a forecast
    # answers for other sessions or another sequence fail the whole-message comparison and are walked
    assert b.forecasts(_ok(seq, IDS[::-1]), seq) == 64
    assert b.forecasts(_ok(seq + 1), seq) == 64


def test_stream_answer_error_is_read_from_the_bytes() -> None:
    ok = pb.StreamResponse(session_id=IDS[0], sequence=300, forecast=FORECAST).SerializeToString()
    assert not stream_error(ok)
    assert stream_error(_error(IDS[0], 300).SerializeToString())
    assert stream_error(pb.StreamResponse(session_id=IDS[0], sequence=1).SerializeToString())  # no result
    assert stream_error(ok[:10])  # cut short
