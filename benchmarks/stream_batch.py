"""StreamBatch throughput (issue 9): session-steps/s with many sessions per message, beside onnxruntime's
in-process step rate at the same batch for the same graph, measured in the same run.

Each stream carries `--per-message` sessions; a round sends one message holding one new row for each of
them and waits for its answer (closed loop). The client sends pre-serialized bytes from its own
processes and parses every answer, so a step that failed is counted as an error. The server and the
client share this machine's cores: compare the ratio, not the absolute figure, across machines.

    python -m benchmarks.stream_batch                     # 8 streams x 64 sessions per message, 10 s
    python -m benchmarks.stream_batch --seconds 3 --streams 4

benchmarks/throughput.py calls `stream_batch_point` for its StreamBatch row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.load import ort_ceiling, start_server
from benchmarks.throughput import MODEL, bench_repo, observe_bytes, split, stop
from gatecast.manifest import Manifest
from gatecast.v1 import forecaster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
STREAM_BATCH = "/gatecast.v1.Forecaster/StreamBatch"
OPEN = "/gatecast.v1.Forecaster/OpenSession"


async def call_many(channel: grpc.aio.Channel, method: str, payloads: list[bytes], concurrency: int) -> list[bytes]:
    """Unary calls with `concurrency` in flight; the answers' bytes in request order."""
    call = channel.unary_unary(method)  # bytes both ways
    answers: list[bytes] = [b""] * len(payloads)

    async def worker(k: int) -> None:
        for i in range(k, len(payloads), concurrency):
            answers[i] = await call(payloads[i], timeout=60)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return answers


def open_sessions(address: str, n: int, model: str = MODEL, concurrency: int = 64) -> list[str]:
    async def run() -> list[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            request = pb.OpenSessionRequest(model=model).SerializeToString()
            answers = await call_many(channel, OPEN, [request] * n, concurrency)
        return [pb.OpenSessionResponse.FromString(a).session_id for a in answers]

    return asyncio.run(run())


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field's wire form (the length as a varint)."""
    out, n = bytearray([number << 3 | 2]), len(payload)
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def batch_bytes(session_ids: list[str], seq: int, row: bytes) -> bytes:
    """An ObserveBatchRequest with one step (sequence `seq`, rows `row`) per session, written directly."""
    return b"".join(_field(1, observe_bytes(sid, seq, row)) for sid in session_ids)


async def _streams(address: str, groups: list[list[str]], row: bytes, warmup: float, seconds: float) -> Any:
    """Closed loops, one per group: (steps answered in the window, step errors, message latencies, steps
    answered in all)."""
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 30)
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + seconds
    steps = errors = answered = 0
    lat: list[float] = []

    async def one(ids: list[str]) -> None:
        nonlocal steps, errors, answered
        out: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def send() -> AsyncIterator[bytes]:
            while (m := await out.get()) is not None:
                yield m

        call = channel.stream_stream(STREAM_BATCH)(send())  # bytes both ways
        seq = 0
        while (t := time.perf_counter()) < end:
            seq += 1
            out.put_nowait(batch_bytes(ids, seq, row))
            reply = await call.read()
            if reply is grpc.aio.EOF:
                errors += len(ids)
                return
            answer = pb.ObserveBatchResponse.FromString(reply)
            failed = sum(r.WhichOneof("result") != "forecast" for r in answer.results)
            answered += len(answer.results) - failed
            done = time.perf_counter()
            if t >= begin and done <= end:
                steps += len(answer.results) - failed
                errors += failed
                lat.append(done - t)
        out.put_nowait(None)
        while await call.read() is not grpc.aio.EOF:
            pass

    await asyncio.gather(*(one(g) for g in groups))
    await channel.close()
    return steps, errors, lat, answered


def _client(address: str, groups: list[list[str]], row: bytes, warmup: float, seconds: float, conn: Any) -> None:
    try:
        conn.send(asyncio.run(_streams(address, groups, row, warmup, seconds)))
    finally:
        conn.close()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_batch_point(
    address: str,
    ids: list[str],
    row: bytes,
    per_message: int = 64,
    client_procs: int = 1,
    seconds: float = 10.0,
    warmup: float = 2.0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """StreamBatch against a running gatecast: len(ids) // per_message streams, each a closed loop of one
    message of `per_message` one-row steps; `row` is a serialized Matrix of one row. The sessions must be
    fresh (their next sequence 1) and on the benchmark model. With `server_pid`, the server's CPU time
    while the clients ran, per step they had answered (warm-up included), is reported too: a figure less
    at the mercy of a busy machine than the rate."""
    groups = [ids[k : k + per_message] for k in range(0, len(ids) - per_message + 1, per_message)]
    ctx = mp.get_context("spawn")  # no fork of a process that has used grpc
    cpu = [cpu_s(server_pid)] if server_pid is not None else []
    procs, conns, first = [], [], 0
    for n in split(len(groups), client_procs):
        parent, child = ctx.Pipe(duplex=False)
        mine = groups[first : first + n]
        first += n
        p = ctx.Process(target=_client, args=(address, mine, row, warmup, seconds, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    results = [c.recv() if c.poll(warmup + seconds + 120) else (0, 0, [], 0) for c in conns]
    if server_pid is not None:
        cpu.append(cpu_s(server_pid))
    for p in procs:
        p.join(10)
    lat = np.asarray([x for r in results for x in r[2]])
    steps_per_s = sum(r[0] for r in results) / seconds
    extra = {}
    if cpu and (answered := sum(r[3] for r in results)):
        extra = {"server_cpu_s": cpu[1] - cpu[0], "server_cpu_us_per_step": 1e6 * (cpu[1] - cpu[0]) / answered}
    return {
        "streams": len(groups),
        "sessions_per_message": per_message,
        "session_steps_per_s": steps_per_s,
        "errors": sum(r[1] for r in results),
        "message_p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else float("nan"),
        "message_p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else float("nan"),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--per-message", type=int, default=64, help="sessions (one step each) per message")
    ap.add_argument("--client-procs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_batch.json")
    a = ap.parse_args()

    repo = bench_repo()
    folder = repo / MODEL / "1"
    m = Manifest.read(folder)
    n = a.streams * a.per_message
    env = {"GATECAST_MAX_SESSIONS": str(n + 10), "GATECAST_MAX_QUEUE_SIZE": str(n + 1024)}
    row = pb.Matrix(rows=1, cols=1, values=[float(m.scaler.mean[0])]).SerializeToString()
    proc, port = start_server(repo, env)
    try:
        address = f"127.0.0.1:{port}"
        ids = open_sessions(address, n)
        point = stream_batch_point(address, ids, row, a.per_message, a.client_procs, a.seconds, a.warmup, proc.pid)
    finally:
        stop(proc)  # type: ignore[arg-type]
    ort = ort_ceiling(folder, a.per_message, 1, min(a.seconds, 5.0))
    result = {
        "model": f"{m.name} ({m.cell} {m.layers}x{m.hidden_size}, horizon {m.horizon})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; client ({a.client_procs} process(es)) and server "
        "share them",
        "server_settings": f"defaults, {env}",
        "seconds": a.seconds,
        "stream_batch": point,
        "onnxruntime_in_process": ort,
        "ratio_to_onnxruntime": point["session_steps_per_s"] / ort["items_per_s"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["model"], "|", result["machine"])
    print(f"{'':<34}{'steps/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    label = f"StreamBatch {point['streams']} x {a.per_message}/message"
    print(
        f"{label:<34}{point['session_steps_per_s']:>12.0f}{point['message_p50_ms']:>9.2f}"
        f"{point['message_p99_ms']:>9.2f}{point['errors']:>8}"
    )
    print(f"{'onnxruntime in process, batch ' + str(a.per_message):<34}{ort['items_per_s']:>12.0f}")
    if "server_cpu_us_per_step" in point:
        print(
            f"server: {point['server_cpu_us_per_step']:.1f} us of CPU per step answered (onnxruntime in process: "
            f"{1e6 / ort['items_per_s']:.1f} us of wall time per step, 2 threads)"
        )
    print(f"ratio {result['ratio_to_onnxruntime']:.2f}; wrote {a.out}")


if __name__ == "__main__":
    main()
