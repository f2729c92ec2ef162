"""What the cluster costs and gives (issue 12), on loopback with deploy/cluster.py (`gatecast serve` replicas,
HAProxy with deploy/haproxy.cfg, Redis):

- per-step latency of a session (one-row Observe, one call at a time, over 8 sessions in turn): straight to
  a replica, through the proxy, and through the proxy with the shared session store written every step;
  the last two differ by what the store costs a step;
- one-shot Forecast requests per second (the default model, a 432-row history, `--concurrency` in flight)
  through the proxy to 1 replica (the others taken off with the proxy's admin socket) and to 3.

Replicas, proxy, Redis and the client share this machine's cores: on a 2-core machine three replicas add
no cores, and the 1-vs-3 row says what spreading costs rather than what it gains.

    python -m benchmarks.cluster [--steps 1500] [--seconds 6] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from deploy.cluster import Cluster
from gatecast import SESSION_HEADER
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVE_ARGS = ("--providers", "CPUExecutionProvider")
MODEL = "taylor"
SESSIONS = 8


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def step_latency(target: str, steps: int, series: np.ndarray) -> dict[str, float]:
    """Milliseconds per Observe of one row, one call at a time, sessions stepped in turn."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        ids = [secrets.token_hex(16) for _ in range(SESSIONS)]
        for sid in ids:
            stub.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=[(SESSION_HEADER, sid)], timeout=10)
        times = []
        for t in range(steps + SESSIONS * 5):  # the first 5 steps of each session warm the path up
            sid, seq = ids[t % SESSIONS], t // SESSIONS + 1
            request = pb.ObserveRequest(session_id=sid, sequence=seq, rows=_matrix(series[t % len(series)][None]))
            t0 = time.perf_counter()
            stub.Observe(request, metadata=[(SESSION_HEADER, sid)], timeout=10)
            times.append(time.perf_counter() - t0)
        for sid in ids:
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=[(SESSION_HEADER, sid)], timeout=10)
    ms = np.array(times[SESSIONS * 5 :]) * 1e3
    return {
        "mean_ms": round(float(ms.mean()), 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


async def _one_shots(target: str, seconds: float, concurrency: int, request: pb.ForecastRequest) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        counts = {"done": 0, "failed": 0}

        async def worker(end: float, count: bool) -> None:
            while time.monotonic() < end:
                try:
                    await stub.Forecast(request, timeout=30)
                    counts["done"] += count
                except grpc.aio.AioRpcError:
                    counts["failed"] += 1

        await asyncio.gather(*(worker(time.monotonic() + 1.0, False) for _ in range(concurrency)))  # warm-up
        t0 = time.monotonic()
        await asyncio.gather(*(worker(t0 + seconds, True) for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    return {"req_per_s": round(counts["done"] / elapsed, 1), "failed": counts["failed"]}


def one_shots(cluster: Cluster, replicas: int, seconds: float, concurrency: int, history: np.ndarray) -> dict[str, Any]:
    """Forecast req/s through the proxy with only the first `replicas` replicas taking one-shot calls."""
    off = sorted(cluster.replicas)[replicas:]
    for name in off:
        cluster.admin(f"set server oneshot/{name} state maint")
    try:
        request = pb.ForecastRequest(model=MODEL, series=[_matrix(history)])
        return {"replicas": replicas, **asyncio.run(_one_shots(cluster.target, seconds, concurrency, request))}
    finally:
        for name in off:
            cluster.admin(f"set server oneshot/{name} state ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="timed Observe calls per configuration")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed window of each one-shot run")
    ap.add_argument("--concurrency", type=int, default=16, help="one-shot calls in flight")
    ap.add_argument("--repo", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.json")
    a = ap.parse_args()

    taylor = ROOT / "data" / "taylor_halfhourly.csv"
    series = np.loadtxt(taylor, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]
    latency: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    for store in (False, True):
        tmp = Path(tempfile.mkdtemp(prefix="gatecast-bench-cluster-"))
        with Cluster(a.repo, str(tmp / "grpc.sock"), store=store, workdir=tmp, serve_args=SERVE_ARGS) as c:
            if store and not c.store:
                raise SystemExit("this server has no session store (settings session_store_url)")
            if not store:
                direct = c.replicas["r1"].address
                latency.append({"path": "replica, no proxy", **step_latency(direct, a.steps, series)})
                latency.append({"path": "proxy", **step_latency(c.target, a.steps, series)})
                for n in (1, 3):
                    throughput.append(one_shots(c, n, a.seconds, a.concurrency, series[-432:]))
            else:
                latency.append({"path": "proxy + Redis store", **step_latency(c.target, a.steps, series)})

    print(f"{'session step (one row)':<26}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for row in latency:
        print(f"{row['path']:<26}{row['mean_ms']:>10.3f}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}")
    store_cost = {k: round(latency[2][k] - latency[1][k], 3) for k in ("mean_ms", "p50_ms")}
    print(f"the store adds {store_cost['p50_ms']:.3f} ms per step at the median ({store_cost['mean_ms']:.3f} mean)\n")
    print(f"{'one-shot Forecast':<26}{'req/s':>10}{'failed':>10}")
    for row in throughput:
        print(f"{str(row['replicas']) + ' replica(s) via proxy':<26}{row['req_per_s']:>10.1f}{row['failed']:>10}")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (replicas, proxy, Redis and client share them)",
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # before, after: other work
        "model": MODEL,
        "steps": a.steps,
        "sessions": SESSIONS,
        "concurrency": a.concurrency,
        "seconds": a.seconds,
        "step_latency": latency,
        "store_cost_ms_per_step": store_cost,
        "one_shot": throughput,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; wrote {a.out}")


if __name__ == "__main__":
    main()
