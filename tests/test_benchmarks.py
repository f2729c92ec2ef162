"""The benchmark clients' wire helpers (benchmarks/bytes_client.py, benchmarks/stream_batch.py) against
protobuf's own encoding, and h2load's answer check (benchmarks/throughput.py) against a real gRPC server:
a client that miscounts errors would report figures for answers that were never good."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.bytes_client import observe_bytes, stream_error
from benchmarks.load import free_port
from benchmarks.stream_batch import BatchSteps, batch_bytes, batch_counts
from benchmarks.throughput import h2load_point, h2load_run
from deploy.packages import ensure_installed
from gatecast.v1 import forecaster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, int]]:
    """benchmarks/echo_server.py answering every unary call with 113 bytes; (address, answer size)."""
    answer = bytes(range(113))
    cmd = [sys.executable, "-m", "benchmarks.echo_server", f"--unary-hex={answer.hex()}", "--bidi-hex=00"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield f"127.0.0.1:{int(line.rsplit(' ', 1)[1])}", len(answer)
    finally:
        proc.kill()
        proc.wait()


def test_h2load_counts_answers_by_their_size(echo: tuple[str, int], tmp_path: Path) -> None:
    h2load = ensure_installed("h2load", "nghttp2-client")
    address, size = echo
    body = tmp_path / "request.grpc"
    body.write_bytes(b"\0\0\0\0\x03abc")
    good = h2load_run(h2load, f"http://{address}/bench.Echo/Unary", body, size, 2, 4, 0.5)
    assert good.done > 0 and good.good == good.done and good.errors == 0
    assert len(good.latencies_s) == good.done and min(good.latencies_s) > 0
    # an unknown method: HTTP 200 with grpc-status 12 in the trailers, no message; each one an error
    bad = h2load_run(h2load, f"http://{address}/bench.Echo/Nope", body, size, 2, 4, 0.5)
    assert bad.done > 0 and bad.good == 0 and bad.errors == bad.done and bad.latencies_s == []
    # answers of another size than expected are not counted good either
    other = h2load_run(h2load, f"http://{address}/bench.Echo/Unary", body, size + 1, 1, 1, 0.5)
    assert other.done > 0 and other.good == 0 and other.errors == other.done


def test_answers_of_another_size_are_never_counted_good_even_when_their_total_divides() -> None:
    """Found when the echo got faster: 1,428 answers of 118 bytes expected at 119 read as 1,416 good ones
    and 12 errors, because 1,428 x 118 = 1,416 x 119."""
    from benchmarks.throughput import good_answers

    assert good_answers(1428, 1428 * 118, 119) == 0  # every answer one byte short
    assert good_answers(100, 100 * 118, 119) == 0  # not a whole number of expected messages
    assert good_answers(100, 100 * 119, 119) == 100  # all good
    assert good_answers(100, 97 * 119, 119) == 97  # three errors: HTTP 200, no message
    assert good_answers(100, 0, 119) == 0  # every call an error


def test_h2load_point_of_a_server_that_is_gone_has_no_figures() -> None:
    h2load = ensure_installed("h2load", "nghttp2-client")
    a = argparse.Namespace(connections=2, warmup=0.2, seconds=0.5)
    point = h2load_point(h2load, os.getpid(), f"127.0.0.1:{free_port()}", "/bench.Echo/Unary", b"abc", 8, a)
    assert point["errors"] == 1 and point["per_s"] == 0 and "UNAVAILABLE" in point["failed"]
    assert np.isnan(point["p99_ms"])


def test_points_taken_twice_merge_rates_by_mean_and_counts_by_sum() -> None:
    """Found in review: equal error counts of two runs were kept, not summed."""
    from benchmarks.throughput import _mean_point

    runs = [
        {"streams": 16, "sessions": 512, "per_s": 1000.0, "errors": 3},
        {"streams": 16, "sessions": 512, "per_s": 3000.0, "errors": 3},
    ]
    merged = _mean_point(runs)
    assert (merged["streams"], merged["sessions"], merged["per_s"], merged["errors"]) == (16, 512, 2000.0, 6)
    assert merged["runs"] == runs


def test_reach_is_the_cores_over_the_echos_cpu_plus_the_graphs_and_flags_a_target_beyond_it() -> None:
    from benchmarks.throughput import reach

    result: dict[str, Any] = {
        "model_cpu": [{"cpu_us_per_window": 200.0}, {"cpu_us_per_window": 300.0}],  # bracketing runs: mean 250
        "servers": {
            "echo": {
                "unary": [
                    {"concurrency": 8, "server_cpu_us": 400.0, "client_cpu_us": 50.0},
                    {"concurrency": 128, "server_cpu_us": 300.0, "client_cpu_us": 50.0},
                ]
            },
            "triton": {"unary": [{"concurrency": 8, "per_s": 700.0}, {"concurrency": 128, "per_s": 2000.0}]},
        },
    }
    reach(result)
    cores = os.cpu_count() or 1
    low, high = result["reach"]
    assert low["model_cpu_us"] == 250.0 and low["per_s"] == cores * 1e6 / 700.0
    assert high["per_s"] == cores * 1e6 / 600.0
    assert low["two_x_triton_per_s"] == 1400.0 and high["two_x_triton_per_s"] == 4000.0
    # within reach: twice Triton no more than the cores can answer at that CPU per call (on 2 cores: yes, no)
    assert low["two_x_triton_within_reach"] == (cores * 1e6 / 700.0 >= 1400.0)
    assert high["two_x_triton_within_reach"] == (cores * 1e6 / 600.0 >= 4000.0)
    # without an echo in the run there is nothing to reason from
    bare: dict[str, Any] = {"model_cpu": result["model_cpu"], "servers": {"gatecast": {"unary": []}}}
    reach(bare)
    assert "reach" not in bare


def test_a_run_whose_echo_answered_only_observe_points_still_gets_its_ratios() -> None:
    """Found running `--servers gatecast --observe 64`: the Observe points bring an echo of their own, with
    no unary points, and the ratios and the reach then failed with KeyError 'unary' after the whole run."""
    from benchmarks.throughput import ratios, reach

    result: dict[str, Any] = {
        "model_cpu": [{"cpu_us_per_window": 200.0}],
        "servers": {
            "echo": {"observe": [{"concurrency": 64, "per_s": 2000.0}]},
            "gatecast": {
                "unary": [{"concurrency": 128, "per_s": 1900.0}],
                "observe": [{"concurrency": 64, "per_s": 1000.0}],
            },
        },
    }
    ratios(result)
    reach(result)
    gatecast = result["servers"]["gatecast"]
    assert gatecast["observe"][0]["of_echo"] == 0.5
    assert gatecast["unary"][0]["of_echo"] is None  # no unary echo in this run: no share of it
    assert result["reach"] == []
