"""Server memory for many open sessions (issue 9): a real `gatecast serve` process, the LSTM 2x64 benchmark
model (1,024 bytes of state per session), and its resident set size (RSS, /proc/<pid>/status) measured
before, with N sessions open, optionally after one StreamBatch step of each (which stores each session's
last answer), and after every session is closed again. The sessions live in the server's main process, whose
RSS is the figure; its forecast workers (processes that answer unary Forecasts and hold no session) are
reported beside it.

Clients in `--client-procs` processes open (and later close) their share of the sessions with unary calls,
`--concurrency` in flight each. Prints a table and writes JSON. A session opened without a history has
never had its state written: those pages of the pool are not resident yet, so the figure per session
that counts is the one after each session's first step (state written, last answer stored).

    python -m benchmarks.sessions_memory                      # 1,000,000 sessions (20-40 minutes on 2 cores)
    python -m benchmarks.sessions_memory --sessions 100000 --no-step
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

from benchmarks.load import start_server
from benchmarks.stream_batch import OPEN, STREAM_BATCH, batch_bytes, call_many
from benchmarks.throughput import MODEL, bench_repo, split, stop
from gatecast.manifest import Manifest
from gatecast.v1 import forecaster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CLOSE = "/gatecast.v1.Forecaster/CloseSession"
MIB = 1024 * 1024
# each phase is read this long after it ends: longer than one sweep of the session table (the server's
# default interval, set explicitly), which trims the C heap once many sessions have opened, closed or stepped
# (sessions.TRIM_CHURN), so that the figure is the settled server's. It was 2 s, less than a sweep: whether
# a trim came before the reading was chance
SWEEP_S = 5.0
SETTLE_S = SWEEP_S + 1.0


def rss(pid: int) -> dict[str, int]:
    """Resident and peak resident bytes of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def children_rss(pid: int) -> int:
    """Resident bytes of a process's children: the server's forecast workers, which hold no sessions."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += rss(int(d.name))["rss"]
        except (OSError, KeyError, ValueError):
            continue
    return total


async def _step_all(channel: grpc.aio.Channel, ids: list[str], row: bytes, streams: int) -> int:
    """One step (sequence 1) of every session, 64 per StreamBatch message; returns the steps that failed."""
    failed = 0

    async def one(mine: list[str]) -> None:
        nonlocal failed
        out: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def send() -> AsyncIterator[bytes]:
            while (m := await out.get()) is not None:
                yield m

        call = channel.stream_stream(STREAM_BATCH)(send())
        for k in range(0, len(mine), 64):
            out.put_nowait(batch_bytes(mine[k : k + 64], 1, row))
            answer = pb.ObserveBatchResponse.FromString(await call.read())
            failed += sum(r.WhichOneof("result") != "forecast" for r in answer.results)
        out.put_nowait(None)
        while await call.read() is not grpc.aio.EOF:
            pass

    await asyncio.gather(*(one(ids[k::streams]) for k in range(streams)))
    return failed


def _client(address: str, n: int, concurrency: int, row: bytes, conn: Any) -> None:
    """Takes commands from the parent: open, step, close; answers each with (count, errors)."""

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MIB)])
        await asyncio.wait_for(channel.channel_ready(), 30)
        request = pb.OpenSessionRequest(model=MODEL).SerializeToString()
        ids: list[str] = []
        while (command := conn.recv()) != "quit":
            if command == "open":
                answers = await call_many(channel, OPEN, [request] * n, concurrency)
                ids = [pb.OpenSessionResponse.FromString(a).session_id for a in answers]
                conn.send((len(ids), 0))
            elif command == "step":
                conn.send((len(ids), await _step_all(channel, ids, row, 8)))
            elif command == "close":
                closes = [pb.CloseSessionRequest(session_id=s).SerializeToString() for s in ids]
                await call_many(channel, CLOSE, closes, concurrency)
                conn.send((len(ids), 0))
                ids = []
        await channel.close()

    try:
        asyncio.run(serve())
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=128, help="calls in flight per client process")
    ap.add_argument(
        "--step", action=argparse.BooleanOptionalAction, default=True, help="step every session once before closing"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sessions_memory.json")
    a = ap.parse_args()

    repo = bench_repo()
    m = Manifest.read(repo / MODEL / "1")
    state_bytes = sum(4 * s.dims[0] * s.dims[1] for s in m.states)
    env = {
        "GATECAST_MAX_SESSIONS": str(a.sessions + 10),
        "GATECAST_SESSION_IDLE_S": "86400",
        "GATECAST_SESSION_SWEEP_S": str(SWEEP_S),
    }
    proc, port = start_server(repo, env)
    address = f"127.0.0.1:{port}"
    row = pb.Matrix(rows=1, cols=1, values=[float(m.scaler.mean[0])]).SerializeToString()
    ctx = mp.get_context("spawn")
    clients: list[Any] = []
    conns: list[Any] = []
    phases: list[dict[str, Any]] = []

    def phase(name: str, command: str | None) -> None:
        t0 = time.monotonic()
        count = errors = 0
        if command is not None:
            for c in conns:
                c.send(command)
            for c in conns:
                done, failed = c.recv()
                count, errors = count + done, errors + failed
        time.sleep(SETTLE_S)  # let the server settle: at least one sweep has run since the phase ended
        phases.append(
            {
                "phase": name,
                "seconds": round(time.monotonic() - t0, 1),
                "errors": errors,
                **rss(proc.pid),
                "workers_rss": children_rss(proc.pid),
            }
        )
        last = phases[-1]
        workers = f"forecast workers {last['workers_rss'] / MIB:.1f} MiB"
        print(f"{name:<28}{last['rss'] / MIB:>10.1f} MiB  ({workers}; {last['seconds']} s)", flush=True)

    try:
        for n in split(a.sessions, a.client_procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client, args=(address, n, a.concurrency, row, child), daemon=True)
            p.start()
            clients.append(p)
            conns.append(parent)
        phase("started", None)
        phase(f"{a.sessions:,} sessions open", "open")
        if a.step:
            phase("each stepped once", "step")
        phase("all closed", "close")
        for c in conns:
            c.send("quit")
    finally:
        for p in clients:
            p.join(30)
        stop(proc)  # type: ignore[arg-type]

    result = {
        "model": f"{m.name} ({m.cell} {m.layers}x{m.hidden_size}, horizon {m.horizon}); {state_bytes} bytes of state "
        "per session",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sessions": a.sessions,
        "phases": phases,
        **summary(phases, a.sessions, state_bytes),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['summary']}; wrote {a.out}")


def summary(phases: list[dict[str, Any]], sessions: int, state_bytes: int) -> dict[str, Any]:
    """Bytes per session from the phases' RSS (the last phase is `all closed`)."""
    base, full = phases[0]["rss"], phases[-2]["rss"]  # with each session stepped, when it was
    per = (full - base) / sessions
    out = {
        "rss_bytes_per_open_session_never_stepped": (phases[1]["rss"] - base) / sessions,
        "rss_bytes_per_session": per,
        "beside_state_bytes_per_session": per - state_bytes,
        "rss_gib_with_all_sessions": full / 2**30,
        "peak_rss_gib": max(p["peak"] for p in phases) / 2**30,
        "rss_after_close_minus_start_mib": (phases[-1]["rss"] - base) / MIB,
        # the forecast workers (GATECAST_FORECAST_WORKERS) are processes of their own that hold no session
        "forecast_workers_rss_mib": max(p.get("workers_rss", 0) for p in phases) / MIB,
    }
    stepped = " (each stepped once)" if len(phases) > 3 else " (never stepped: state pages not resident)"
    out["summary"] = (
        f"{per:.0f} bytes per session{stepped}, {per - state_bytes:.0f} beside its {state_bytes} bytes of state; "
        f"{out['rss_gib_with_all_sessions']:.3f} GiB with {sessions:,} sessions; after closing them "
        f"{out['rss_after_close_minus_start_mib']:+.1f} MiB from the start"
    )
    return out


if __name__ == "__main__":
    main()
