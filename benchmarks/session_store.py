"""What the session store (issue 12, service/store.py) costs per step: the real server in a subprocess, a
real redis-server on loopback, a real gRPC client here.

For each configuration (no store; a store written every step, N = 1; every N steps) it measures:
1. one session stepped one Observe after another: the latency per step (p50, p99), i.e. what a client
   waits for the answer that is in Redis before it leaves;
2. `--sessions` sessions stepped concurrently (one Observe in flight each): steps per second and latency.

    python -m benchmarks.session_store --out benchmarks/results/session_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.load import start_server
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "taylor_halfhourly.csv"
MODEL = ROOT / "models" / "taylor"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_redis_server() -> str:
    """The redis-server binary; Debian's package is installed when it is missing (as root, in CI)."""
    found = shutil.which("redis-server")
    if found is None:
        install = ["apt-get", "install", "-y", "-q", "redis-server"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
            subprocess.run(install, capture_output=True, check=True)
        found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed and apt-get could not install it")
    return found


class RedisServer:
    """A real redis-server on loopback, with no persistence, its files in `workdir`. redis-server cannot
    bind port 0, so a free port is picked (and another tried if it was taken meanwhile); `start` again
    after `stop` reuses the port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = ensure_redis_server()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        for _ in range(5):
            self.port = self.port or _free_port()
            cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            self.proc = subprocess.Popen([*cmd, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
            if self._ready():
                return self
            self.proc.kill()
            self.proc.wait()
            self.port = 0
        raise RuntimeError("redis-server did not start")

    def _ready(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def _percentiles(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


async def _run(address: str, values: np.ndarray, steps: int, sessions: int) -> dict[str, Any]:
    history = values[:480, None]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        opened = [
            await stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=_matrix(history)))
            for _ in range(sessions)
        ]
        ids = [o.session_id for o in opened]

        async def step(i: int, seq: int) -> float:
            row = values[480 + seq, None][None]
            t0 = time.perf_counter()
            await stub.Observe(pb.ObserveRequest(session_id=ids[i], sequence=seq, rows=_matrix(row)))
            return time.perf_counter() - t0

        for seq in range(1, 21):  # warm-up
            await step(0, seq)
        single = [await step(0, seq) for seq in range(21, 21 + steps)]

        async def client(i: int, n: int, lat: list[float]) -> None:
            start = 1 if i else 21 + steps
            for seq in range(start, start + n):
                lat.append(await step(i, seq))

        lat: list[float] = []
        rounds = max(1, steps // 4)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, rounds, lat) for i in range(sessions)))
        elapsed = time.perf_counter() - t0
    return {
        "single": _percentiles(single),
        "concurrent": {**_percentiles(lat), "steps_per_s": round(len(lat) / elapsed, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="sequential steps of one session")
    parser.add_argument("--sessions", type=int, default=32, help="sessions stepped concurrently")
    parser.add_argument("--every", type=int, default=10, help="the N > 1 to compare with N = 1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(MODEL, repo / "taylor")
        redis_server = RedisServer(Path(tmp)).start()
        try:
            for label, env in [
                ("no store", {}),
                ("store, every step (N=1)", {"GATECAST_SESSION_STORE_EVERY": "1"}),
                (f"store, every {args.every} steps", {"GATECAST_SESSION_STORE_EVERY": str(args.every)}),
            ]:
                if env:
                    env["GATECAST_SESSION_STORE_URL"] = redis_server.url
                proc, port = start_server(repo, env)
                try:
                    result = asyncio.run(_run(f"127.0.0.1:{port}", values, args.steps, args.sessions))
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                rows.append({"config": label, **result})
        finally:
            redis_server.stop()
    base = rows[0]["single"]["p50_ms"]
    many = f"{args.sessions} sessions p50/p99 ms"
    print(f"{'config':<28} {'1 session p50/p99 ms':>22} {'extra p50 ms':>13} {many:>24} {'steps/s':>9}")
    for r in rows:
        s, c = r["single"], r["concurrent"]
        r["extra_p50_ms_per_step"] = round(s["p50_ms"] - base, 3)
        print(
            f"{r['config']:<28} {s['p50_ms']:>10.3f} / {s['p99_ms']:<9.3f} {r['extra_p50_ms_per_step']:>13.3f} "
            f"{c['p50_ms']:>11.3f} / {c['p99_ms']:<10.3f} {c['steps_per_s']:>9.1f}"
        )
    if args.out is not None:
        report = {
            "benchmark": "session_store",
            "steps": args.steps,
            "sessions": args.sessions,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
