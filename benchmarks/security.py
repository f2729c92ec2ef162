"""What TLS, mutual TLS and bearer tokens cost: the real server in its own process (benchmarks.load's
start_server) in four modes, asyncio gRPC clients in this one, certificates made with tests/test_security's
make_pki. Per mode: one-row Observe steps and 432-row Forecast windows (closed loops), and the time to
open a new connection and get a first answer (the TLS handshake is paid per connection, not per call).
The four servers run side by side and the modes take turns, round after round, so that whatever else
the machine does falls on all of them alike; each figure is the median over the rounds.

    python -m benchmarks.security --out benchmarks/results/security.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.load import DATA, ROOT, _matrix, _pct, start_server
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.test_security import make_pki

TOKEN = "benchmark-token-" + "0" * 32
MODES = ("plain", "tls", "mtls", "tls+token")


def _env(mode: str, d: Path) -> dict[str, str]:
    tls = {"GATECAST_TLS_CERT_FILE": str(d / "server.pem"), "GATECAST_TLS_KEY_FILE": str(d / "server.key")}
    return {
        "plain": {},
        "tls": tls,
        "mtls": {**tls, "GATECAST_TLS_CLIENT_CA_FILE": str(d / "ca.pem")},
        "tls+token": {**tls, "GATECAST_AUTH_TOKENS_FILE": str(d / "tokens")},
    }[mode]


def _channel(mode: str, d: Path, address: str, own: bool = False) -> grpc.aio.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)] if own else []
    if mode == "plain":
        return grpc.aio.insecure_channel(address, options=options)
    key_cert = ((d / "client.key").read_bytes(), (d / "client.pem").read_bytes()) if mode == "mtls" else (None, None)
    creds = grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(), *key_cert)
    return grpc.aio.secure_channel(address, creds, options=options)


async def _loop(concurrency: int, seconds: float, call: Callable[[int, int], Awaitable[Any]]) -> dict[str, Any]:
    lat: list[float] = []
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        k = 0
        while time.monotonic() < stop_at:
            k += 1
            t0 = time.monotonic()
            await call(i, k)
            lat.append(time.monotonic() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"rps": len(lat) / (time.monotonic() - t0), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99)}


async def bench(mode: str, d: Path, address: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """One round of one mode; sessions are new each round (their sequence numbers start again at 1)."""
    md = [("authorization", f"Bearer {TOKEN}")] if mode == "tls+token" else None
    values = np.loadtxt(DATA, delimiter=",", skiprows=1, usecols=1, dtype=np.float32)[:, None]
    window = pb.ForecastRequest(model="taylor", series=[_matrix(values[-432:])])
    row = _matrix(values[:1])
    channel = _channel(mode, d, address)
    stub = pb_grpc.ForecasterStub(channel)
    open_ = pb.OpenSessionRequest(model="taylor")
    ids = [(await stub.OpenSession(open_, metadata=md)).session_id for _ in range(concurrency)]

    async def observe(i: int, k: int) -> None:
        await stub.Observe(pb.ObserveRequest(session_id=ids[i], sequence=k, rows=row), metadata=md, timeout=30)

    async def forecast(i: int, k: int) -> None:
        await stub.Forecast(window, metadata=md, timeout=30)

    out: dict[str, Any] = {
        "observe": await _loop(concurrency, seconds, observe),
        "forecast": await _loop(concurrency, seconds, forecast),
    }
    for sid in ids:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md)
    await channel.close()
    connect: list[float] = []
    for _ in range(20):  # a new connection each time: handshake plus one health check
        t0 = time.monotonic()
        async with _channel(mode, d, address, own=True) as fresh:
            await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=30)
        connect.append(time.monotonic() - t0)
    out["connect_ms"] = _pct(connect, 50)
    return out


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds."""
    out: dict[str, Any] = {}
    for k, v in rounds[0].items():
        values = [r[k] for r in rounds]
        out[k] = _median(values) if isinstance(v, dict) else float(np.median(values))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per workload, mode and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight (one session each for Observe)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "security.json")
    args = ap.parse_args()
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_pki(d)
        (d / "tokens").write_text(TOKEN + "\n")
        servers = {mode: start_server(ROOT / "models", _env(mode, d)) for mode in MODES}
        try:
            for _ in range(args.rounds):
                for mode, (_, port) in servers.items():
                    r = asyncio.run(bench(mode, d, f"127.0.0.1:{port}", args.seconds, args.concurrency))
                    rounds[mode].append(r)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
    results = {mode: _median(rs) for mode, rs in rounds.items()}
    head = ("mode", "Observe/s", "p50 ms", "p99 ms", "Forecast/s", "p50 ms", "p99 ms", "connect ms")
    print("".join(f"{h:>{w}}" for h, w in zip(head, (10, 11, 8, 8, 12, 8, 8, 12), strict=True)))
    for mode, r in results.items():
        o, f = r["observe"], r["forecast"]
        print(
            f"{mode:>10}{o['rps']:>11.0f}{o['p50_ms']:>8.2f}{o['p99_ms']:>8.2f}"
            f"{f['rps']:>12.0f}{f['p50_ms']:>8.2f}{f['p99_ms']:>8.2f}{r['connect_ms']:>12.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "seconds": args.seconds, "rounds": args.rounds}
    args.out.write_text(json.dumps({"meta": {**meta, "concurrency": args.concurrency}, "modes": results}, indent=1))


if __name__ == "__main__":
    main()
