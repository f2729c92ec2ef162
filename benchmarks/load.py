"""Load generator: the real server in its own process, asyncio gRPC clients in this one.

Measures Forecast requests/s and latency at several concurrencies, streaming steps/s and latency for
many live sessions, and the in-process onnxruntime ceiling for the same batch sizes. Prints a table and
writes JSON. Both processes share this machine's cores, so the figures include the client's cost.

    python -m benchmarks.load --out benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from gatecast.graph import session_options, zero_states
from gatecast.manifest import Manifest, version_dirs
from gatecast.service.settings import Settings
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "taylor_halfhourly.csv"


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def _pct(lat: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(lat), q) * 1000.0) if lat else float("nan")


def free_port() -> int:
    """A loopback port the OS says is free now, for a peer that takes an explicit port (tritonserver,
    redis-server): a race with another process is possible, and shows as that peer failing to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(repo: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """`gatecast serve` in a subprocess on a free port; returns the process and the port it bound."""
    env = {**os.environ, "GATECAST_PROVIDERS": '["CPUExecutionProvider"]', **env_extra}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatecast.cli", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            # keep draining the log so the server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    raise RuntimeError(f"server did not start (exit code {proc.wait()})")


async def bench_forecast(
    address: str, model: str, windows: np.ndarray, concurrency: int, seconds: float
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(min(concurrency, 16))]
    stubs = [pb_grpc.ForecasterStub(c) for c in channels]
    requests = [pb.ForecastRequest(model=model, series=[_matrix(w)]) for w in windows[:512]]
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal errors
        stub = stubs[i % len(stubs)]
        k = i
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                await stub.Forecast(requests[k % len(requests)], timeout=30)
                lat.append(time.monotonic() - t0)
            except grpc.aio.AioRpcError:
                errors += 1
            k += concurrency

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t0
    for c in channels:
        await c.close()
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
    }


async def bench_sessions(
    address: str, model: str, values: np.ndarray, sessions: int, streams: int, seconds: float
) -> dict[str, Any]:
    """Each stream carries sessions/streams sessions; a round sends one new row per session and waits
    for all of that round's answers (closed loop), so every session always has one step in flight."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(min(streams, 16))]
    stubs = [pb_grpc.ForecasterStub(c) for c in channels]
    ids: list[str] = []
    for start in range(0, sessions, 256):  # open in waves: one OpenSession per session
        opened = await asyncio.gather(
            *(
                stubs[i % len(stubs)].OpenSession(pb.OpenSessionRequest(model=model), timeout=30)
                for i in range(start, min(sessions, start + 256))
            )
        )
        ids.extend(o.session_id for o in opened)
    rows = [_matrix(values[i : i + 1]) for i in range(1024)]
    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def stream(k: int) -> None:
        nonlocal errors
        mine = ids[k::streams]
        queue: asyncio.Queue[pb.ObserveRequest | None] = asyncio.Queue()
        call = stubs[k % len(stubs)].Stream(_drain(queue))
        seq = 0
        while time.monotonic() < stop_at:
            seq += 1
            sent = time.monotonic()
            for j, sid in enumerate(mine):
                queue.put_nowait(pb.ObserveRequest(session_id=sid, sequence=seq, rows=rows[(seq + j) % len(rows)]))
            for _ in mine:
                r = await call.read()
                if r.WhichOneof("result") != "forecast":
                    errors += 1
                lat.append(time.monotonic() - sent)
        queue.put_nowait(None)
        while await call.read() is not grpc.aio.EOF:
            pass

    t0 = time.monotonic()
    await asyncio.gather(*(stream(k) for k in range(streams)))
    elapsed = time.monotonic() - t0
    for start in range(0, len(ids), 256):
        await asyncio.gather(
            *(stubs[0].CloseSession(pb.CloseSessionRequest(session_id=s)) for s in ids[start : start + 256])
        )
    for c in channels:
        await c.close()
    return {
        "sessions": sessions,
        "streams": streams,
        "steps": len(lat),
        "errors": errors,
        "steps_per_s": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
    }


async def _drain(queue: asyncio.Queue[pb.ObserveRequest | None]):  # type: ignore[no-untyped-def]
    while (item := await queue.get()) is not None:
        yield item


def ort_ceiling(folder: Path, batch: int, time_len: int, seconds: float) -> dict[str, Any]:
    """In-process onnxruntime with the server's default thread settings."""
    m = Manifest.read(folder)
    s = Settings()
    opts = session_options(s.intra_op_threads, s.inter_op_threads, s.allow_spinning)
    sess = ort.InferenceSession(str(folder / m.onnx.file), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = np.asarray(m.scaler.mean) + np.asarray(m.scaler.std) * rng.standard_normal((batch, time_len, m.n_features))
    feed = {"x": x.astype(np.float32)}
    feed.update(zero_states(m.states, batch))
    sess.run(None, feed)
    runs, t0, cpu0 = 0, time.monotonic(), time.thread_time()
    while time.monotonic() - t0 < seconds:
        sess.run(None, feed)
        runs += 1
    elapsed = time.monotonic() - t0
    return {
        "batch": batch,
        "time": time_len,
        "runs_per_s": runs / elapsed,
        "items_per_s": runs * batch / elapsed,
        "ms_per_run": 1000 * elapsed / runs,
        # this thread's CPU per item: what running the graph costs whatever else shares the machine
        "cpu_us_per_item": (time.thread_time() - cpu0) / (runs * batch) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="taylor")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = ap.parse_args()

    versions = version_dirs(args.repo / args.model)
    folder = versions[max(versions)]
    manifest = Manifest.read(folder)
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]
    ctx = manifest.context_length
    windows = np.stack([values[i : i + ctx] for i in range(0, len(values) - ctx, 7)])
    # every live session may have one step queued: size the queue for the largest session count
    env = {
        "GATECAST_MAX_SESSIONS": str(max(args.sessions) + 10),
        "GATECAST_MAX_QUEUE_SIZE": str(max(args.sessions) + 1024),
    }
    proc, port = start_server(args.repo, env)
    address = f"127.0.0.1:{port}"
    try:
        forecast = [
            asyncio.run(bench_forecast(address, args.model, windows, c, args.seconds)) for c in args.concurrency
        ]
        sessions = [
            asyncio.run(bench_sessions(address, args.model, values, n, args.streams, args.seconds))
            for n in args.sessions
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ceiling = [ort_ceiling(folder, b, ctx, min(args.seconds, 3)) for b in (1, 8, 64, 256)]
    ceiling += [ort_ceiling(folder, b, 1, min(args.seconds, 3)) for b in (1, 64, 256)]

    defaults = Settings()
    result = {
        "model": f"{manifest.name} v{manifest.version} ({manifest.cell} {manifest.layers}x{manifest.hidden_size}, "
        f"context {ctx}, horizon {manifest.horizon}, input {manifest.input_form})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU provider; client and server share the cores",
        "server_settings": f"defaults (max_batch_size {defaults.max_batch_size}, max_queue_delay_ms "
        f"{defaults.max_queue_delay_ms:g}, intra_op_threads {defaults.intra_op_threads}), {env}",
        "seconds_per_point": args.seconds,
        "forecast": forecast,
        "sessions": sessions,
        "onnxruntime_in_process": ceiling,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["model"], "|", result["machine"])
    print(f"\nForecast (one series of {ctx} rows per request)")
    print(f"{'concurrency':>12}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in forecast:
        print(f"{r['concurrency']:>12}{r['rps']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>8}")
    print(f"\nStreaming sessions ({args.streams} bidirectional streams, one row per step)")
    print(f"{'sessions':>12}{'steps/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in sessions:
        print(f"{r['sessions']:>12}{r['steps_per_s']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['errors']:>8}")
    print("\nonnxruntime in process (the ceiling)")
    print(f"{'batch':>12}{'time':>6}{'items/s':>12}{'ms/run':>10}")
    for r in ceiling:
        print(f"{r['batch']:>12}{r['time']:>6}{r['items_per_s']:>12.0f}{r['ms_per_run']:>10.3f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
