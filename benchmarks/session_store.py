"""What the session store (issue 12, service/store.py) costs per step: the real server in a subprocess, a
real redis-server on loopback, a real gRPC client here.

For each configuration (no store; a store written every step, N = 1; every N steps) it measures:
1. one session stepped one Observe after another: the latency per step (p50, p99), i.e. what a client
   waits for the answer that is in Redis before it leaves;
2. `--sessions` sessions stepped concurrently (one Observe in flight each): steps per second and latency;
3. the server's CPU per step (and redis-server's), over the sequential steps.
The configurations take turns in rounds, so that a busy moment of the machine hits them all. Beside them,
the store's parts are timed on their own, many times (`components`): what the end-to-end figures are made
of, readable even on a loaded machine.

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

from benchmarks.load import free_port, start_server
from deploy.packages import ensure_installed
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "taylor_halfhourly.csv"
MODEL = ROOT / "models" / "taylor"


def ensure_redis_server() -> str:
    """The redis-server binary; Debian's package is installed when it is missing (as root, in CI)."""
    return ensure_installed("redis-server", "redis-server")


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
            self.port = self.port or free_port()
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Replica:
    """One server process under one configuration, with its sessions and what was measured on it."""

    def __init__(self, label: str, proc: subprocess.Popen[str], port: int) -> None:
        self.label, self.proc, self.port = label, proc, port
        self.ids: list[str] = []
        self.next_seq: list[int] = []
        self.single: list[float] = []
        self.single_p50: list[float] = []
        self.many: list[float] = []
        self.many_steps = 0
        self.many_s = 0.0
        self.cpu = 0.0  # server CPU seconds over the sequential steps
        self.redis_cpu = 0.0
        self.cpu_steps = 0


async def _round(r: Replica, values: np.ndarray, steps: int, sessions: int, redis_pid: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") as channel:
        stub = pb_grpc.ForecasterStub(channel)
        if not r.ids:
            history = _matrix(values[:480, None])
            for _ in range(sessions):
                r.ids.append(
                    (await stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history))).session_id
                )
                r.next_seq.append(1)

        async def step(i: int) -> float:
            seq = r.next_seq[i]
            r.next_seq[i] += 1
            row = values[480 + seq % 10_000, None][None]
            t0 = time.perf_counter()
            await stub.Observe(pb.ObserveRequest(session_id=r.ids[i], sequence=seq, rows=_matrix(row)))
            return time.perf_counter() - t0

        for _ in range(10):  # warm the connection
            await step(0)
        cpu0, redis0 = cpu_s(r.proc.pid), cpu_s(redis_pid)
        lat = [await step(0) for _ in range(steps)]
        r.cpu += cpu_s(r.proc.pid) - cpu0
        r.redis_cpu += cpu_s(redis_pid) - redis0
        r.cpu_steps += steps
        r.single += lat
        r.single_p50.append(float(np.median(lat)))

        async def client(i: int, n: int, out: list[float]) -> None:
            for _ in range(n):
                out.append(await step(i))

        many: list[float] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, max(1, steps // 8), many) for i in range(sessions)))
        r.many_s += time.perf_counter() - t0
        r.many_steps += len(many)
        r.many += many


def components(url: str, n: int = 2000) -> dict[str, Any]:
    """The store's parts for one taylor session, each timed many times (medians resist a busy machine):
    encoding its blob (writer thread), one write's Redis round trip (what N = 1 adds to a step on an idle
    loop), and a write's share of a pipeline of 64 (many sessions stepping at once)."""
    import redis

    from gatecast.service.snapshot import SessionRecord, encode_session
    from gatecast.service.store import _WRITE, KEY

    m = json.loads((MODEL / "1" / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    states = {st["input"]: rng.standard_normal(st["dims"]).astype(np.float32) for st in m["states"]}
    record = SessionRecord(
        "ab" * 16,
        "taylor",
        1,
        m["onnx"]["sha256"],
        1,
        481,
        states,
        rng.standard_normal((m["horizon"], 1)).astype(np.float32),
    )
    blob = encode_session(record)
    client = redis.Redis.from_url(url)
    write = client.register_script(_WRITE)

    def timed(fn: Any, reps: int) -> list[float]:
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    encode = timed(lambda: encode_session(record), n)
    seq = iter(range(1, 10**9))
    single = timed(lambda: write(keys=[KEY + record.id], args=["bench", next(seq), encode_session(record), 60_000]), n)

    def pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        k = next(seq)
        for i in range(64):
            write(keys=[f"{KEY}{i:032x}"], args=["bench", k, encode_session(record), 60_000], client=pipe)
        pipe.execute()

    piped = timed(pipeline, max(10, n // 64))
    client.flushdb()
    client.close()

    def us(xs: list[float], scale: float = 1.0) -> dict[str, float]:
        a = np.asarray(xs) * 1e6 / scale
        return {"p50_us": round(float(np.median(a)), 1), "p99_us": round(float(np.percentile(a, 99)), 1)}

    return {
        "blob_bytes": len(blob),
        "encode": us(encode),
        "write_round_trip": us(single),
        "write_in_pipeline_of_64": us(piped, 64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="sequential steps of one session per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the configurations taking turns")
    parser.add_argument("--sessions", type=int, default=32, help="sessions stepped concurrently")
    parser.add_argument("--every", type=int, default=10, help="the N > 1 to compare with N = 1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)
    replicas: list[Replica] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(MODEL, repo / "taylor")
        redis_server = RedisServer(Path(tmp)).start()
        assert redis_server.proc is not None
        try:
            for label, every in [
                ("no store", 0),
                ("store, every step (N=1)", 1),
                (f"store, every {args.every}", args.every),
            ]:
                env = {"GATECAST_SESSION_STORE_URL": redis_server.url, "GATECAST_SESSION_STORE_EVERY": str(every)}
                replicas.append(Replica(label, *start_server(repo, env if every else {})))
            parts = components(redis_server.url)
            for _ in range(args.rounds):  # taking turns, so that a busy moment of the machine hits them all
                for r in replicas:
                    asyncio.run(_round(r, values, args.steps, args.sessions, redis_server.proc.pid))
        finally:
            for r in replicas:
                r.proc.terminate()
                r.proc.wait(timeout=30)
            redis_server.stop()
    rows: list[dict[str, Any]] = []
    for r in replicas:
        rows.append(
            {
                "config": r.label,
                "single": {
                    **_percentiles(r.single),
                    "p50_of_rounds_ms": round(1000 * float(np.median(r.single_p50)), 3),
                },
                "server_cpu_us_per_step": round(1e6 * r.cpu / r.cpu_steps, 1),
                "redis_cpu_us_per_step": round(1e6 * r.redis_cpu / r.cpu_steps, 1),
                "concurrent": {**_percentiles(r.many), "steps_per_s": round(r.many_steps / r.many_s, 1)},
            }
        )
    base = rows[0]
    for row in rows:
        row["extra_p50_ms_per_step"] = round(row["single"]["p50_of_rounds_ms"] - base["single"]["p50_of_rounds_ms"], 3)
        row["extra_server_cpu_us_per_step"] = round(row["server_cpu_us_per_step"] - base["server_cpu_us_per_step"], 1)
    many = f"{args.sessions} sessions p50/p99 ms"
    print(
        f"{'config':<26} {'1 session p50/p99 ms':>21} {'extra p50':>9} {'CPU us/step':>11} {'+redis':>7} "
        f"{many:>24} {'steps/s':>8}"
    )
    for row in rows:
        s, c = row["single"], row["concurrent"]
        print(
            f"{row['config']:<26} {s['p50_of_rounds_ms']:>9.3f} / {s['p99_ms']:<9.3f} "
            f"{row['extra_p50_ms_per_step']:>9.3f} "
            f"{row['server_cpu_us_per_step']:>11.1f} {row['redis_cpu_us_per_step']:>7.1f} "
            f"{c['p50_ms']:>11.3f} / {c['p99_ms']:<10.3f} {c['steps_per_s']:>8.1f}"
        )
    print(
        f"one taylor session ({parts['blob_bytes']} bytes): encode {parts['encode']['p50_us']} us, one write's "
        f"round trip p50 {parts['write_round_trip']['p50_us']} us (p99 {parts['write_round_trip']['p99_us']}), "
        f"a write in a pipeline of 64: {parts['write_in_pipeline_of_64']['p50_us']} us"
    )
    if args.out is not None:
        report = {
            "benchmark": "session_store",
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "sessions": args.sessions,
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
            "rows": rows,
            "components": parts,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
