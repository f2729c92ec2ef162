"""StreamBatch throughput (issue 9): session-steps/s with many sessions per message, beside onnxruntime's
in-process step rate at the same batch for the same graph, measured in the same run: before the first point
and after each (`CEILING_S`), and each point's ratio is to the mean of the two measurements around it.

Each stream carries `--per-message` sessions; a round sends one message holding one new row for each of
them. `--depth` messages are in flight on each stream (StreamBatch answers in message order and applies a
session's steps in message order): a gateway pipelines, sending the next message while the last is being
answered; `--depth 1` is a closed loop that waits for each answer before sending again.

The client is built to cost little beside the server, and to check every answer (`BatchSteps`): a
message is the round's sequence varint joined between pre-built per-session pieces (one C call, no Python
loop over the sessions: 1.5 us for 64 steps, where encoding each step took 212 us), and an answer is
compared whole, as a numpy array, with what 64 forecasts for those sessions and that sequence begin with
(15 us, where protobuf's parse and a loop over the results took 71 us); an answer that differs is walked
field by field and each step without a forecast counts as an error. The run reports the client's CPU per
step beside the server's. The server and the client share this machine's cores: compare the ratio, not
the absolute figure, across machines.

    python -m benchmarks.stream_batch              # 8 and 32 streams x 64 sessions/message, depths 1 2 4, 10 s each
    python -m benchmarks.stream_batch --seconds 3 --streams 4 --depth 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.bytes_client import observe_head, read_varint, rows_field, stream_error, varint
from benchmarks.load import ort_ceiling, start_server
from benchmarks.throughput import MODEL, bench_repo, split, stop, tree_cpu_s
from gatecast.manifest import Manifest
from gatecast.service import loops
from gatecast.v1 import forecaster_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
STREAM_BATCH = "/gatecast.v1.Forecaster/StreamBatch"
OPEN = "/gatecast.v1.Forecaster/OpenSession"
DEPTH = 2  # messages in flight per stream: one being answered while the next is already there to read
DEPTHS = [1, 2, 4]  # the points `main` measures: closed loop, and two pipelines a gateway might keep
# 8 streams leave the server waiting on the clients' round trips (a stream's next message for the same
# sessions waits for the last one's answer); 32 keep it busy: the rate where the server itself is the limit
STREAMS = [8, 32]
CEILING_S = 2.0  # onnxruntime's in-process rate is measured this long before the first point and after each


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
    return bytes([number << 3 | 2]) + varint(len(payload)) + payload


class BatchSteps:
    """One stream's sessions, each stepped once per message with the same sequence number: the message and
    the check of its answer without a Python loop over the sessions.

    A message is the sequence's varint joined between pre-built pieces (`v.join(pieces)`, one C call): each
    step's bytes around its sequence depend only on the varint's length, so the pieces are built once per
    length. An answer is checked whole against what a forecast for every step must begin with (the
    result's tag and length, the session id, the sequence, the forecast's tag), compared as one numpy array
    of `sessions x prefix` bytes: every result for the right session and sequence in request order, and a
    forecast (field 3), not an error (field 4). An answer that does not match that shape (some step failed,
    or answers of unequal size) is walked field by field instead (`batch_counts`)."""

    def __init__(self, session_ids: list[str], row: bytes) -> None:
        self.n = len(session_ids)
        self.heads = [observe_head(sid) for sid in session_ids]
        self.rows = rows_field(row)
        self._pieces: dict[int, list[bytes]] = {}
        self._prefix: dict[tuple[int, int], tuple[list[bytes], int]] = {}

    def message(self, seq: int) -> bytes:
        """The ObserveBatchRequest of one step (sequence `seq`, the row) per session."""
        v = varint(seq)
        pieces = self._pieces.get(len(v))
        if pieces is None:
            steps = [(b"\x0a" + varint(len(h) + len(v) + len(self.rows)) + h) for h in self.heads]
            pieces = [steps[0], *(self.rows + s for s in steps[1:]), self.rows]
            self._pieces[len(v)] = pieces
        return v.join(pieces)

    def forecasts(self, reply: bytes, seq: int) -> int:
        """How many steps of the answer to message `seq` are forecasts (the rest count as errors)."""
        size = len(reply) // self.n if self.n and len(reply) % self.n == 0 else 0
        if size:
            v = varint(seq)
            pieces, width = self._prefix_pieces(len(v), size)
            if width:
                expected = np.frombuffer(v.join(pieces), np.uint8).reshape(self.n, width)
                got = np.frombuffer(reply, np.uint8).reshape(self.n, size)[:, :width]
                if np.array_equal(got, expected):
                    return self.n
        ok, _ = batch_counts(reply)
        return min(ok, self.n)

    def _prefix_pieces(self, k: int, size: int) -> tuple[list[bytes], int]:
        """What each result of `size` bytes starts with when it is a forecast, around a `k`-byte sequence."""
        if (k, size) not in self._prefix:
            inner = next((size - 1 - j for j in (1, 2, 3) if len(varint(size - 1 - j)) == j), 0)
            if inner <= 0:
                self._prefix[k, size] = [], 0
            else:
                heads = [b"\x0a" + varint(inner) + h for h in self.heads]
                width = len(heads[0]) + k + 1
                same = all(len(h) == len(heads[0]) for h in heads)
                pieces = [heads[0], *(b"\x1a" + h for h in heads[1:]), b"\x1a"]
                self._prefix[k, size] = (pieces, width) if same else ([], 0)
        return self._prefix[k, size]


def batch_counts(reply: bytes) -> tuple[int, int]:
    """(forecasts, errors) in an ObserveBatchResponse, read from its wire form: a result (field 1) with a
    forecast (field 3) counts one forecast; one with an error (field 4), or neither, one error; a message
    refused whole (field 2) counts one error. Unreadable bytes count as (0, 1)."""
    ok = bad = pos = 0
    try:
        while pos < len(reply):
            tag = reply[pos]
            pos += 1
            if tag & 7 == 0:
                _, pos = read_varint(reply, pos)
                continue
            if tag & 7 != 2:
                return ok, bad + 1
            n, pos = read_varint(reply, pos)
            if pos + n > len(reply):
                return ok, bad + 1
            body, pos = reply[pos : pos + n], pos + n
            if tag >> 3 == 2:
                bad += 1
            elif tag >> 3 == 1:
                if stream_error(body):
                    bad += 1
                else:
                    ok += 1
    except IndexError:
        return ok, bad + 1
    return ok, bad


def batch_bytes(session_ids: list[str], seq: int, row: bytes) -> bytes:
    """An ObserveBatchRequest with one step (sequence `seq`, rows `row`) per session, written directly."""
    return BatchSteps(session_ids, row).message(seq)


@dataclass
class StreamCounts:
    """One client process's counts: steps answered with a forecast inside the window, step errors (in the
    whole run), message latencies inside the window (s), steps answered in the whole run, its CPU (s)."""

    steps: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    answered: int = 0
    cpu_s: float = 0.0


async def _streams(
    address: str, groups: list[list[str]], row: bytes, warmup: float, seconds: float, depth: int
) -> StreamCounts:
    """Closed loops, one per group, each with `depth` messages in flight (StreamBatch answers in message
    order, and each session's steps apply in message order)."""
    channel = grpc.aio.insecure_channel(address)
    await asyncio.wait_for(channel.channel_ready(), 30)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    begin, end = t0 + warmup, t0 + warmup + seconds
    c = StreamCounts()

    async def one(ids: list[str]) -> None:
        steps = BatchSteps(ids, row)
        n = steps.n
        call = channel.stream_stream(STREAM_BATCH)()  # bytes both ways, written to directly
        pending: deque[tuple[float, int]] = deque()  # (sent at, sequence) of messages not yet answered
        seq = 0
        clock = time.perf_counter
        while True:
            while len(pending) < depth and (t := clock()) < end:
                seq += 1
                await call.write(steps.message(seq))
                pending.append((t, seq))
            if not pending:
                break
            reply = await call.read()
            if reply is grpc.aio.EOF:
                c.errors += n * len(pending)
                return
            t, s = pending.popleft()
            ok = steps.forecasts(reply, s)
            done = clock()
            c.answered += ok
            c.errors += n - ok
            if t >= begin and done <= end:
                c.steps += ok
                c.latencies.append(done - t)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    await asyncio.gather(*(one(g) for g in groups))
    c.cpu_s = time.process_time() - cpu0
    await channel.close()
    return c


def _client(
    address: str, groups: list[list[str]], row: bytes, warmup: float, seconds: float, depth: int, conn: Any
) -> None:
    try:
        conn.send(asyncio.run(_streams(address, groups, row, warmup, seconds, depth)))
    finally:
        conn.close()


def stream_batch_point(
    address: str,
    ids: list[str],
    row: bytes,
    per_message: int = 64,
    client_procs: int = 1,
    seconds: float = 10.0,
    warmup: float = 2.0,
    server_pid: int | None = None,
    depth: int = DEPTH,
) -> dict[str, Any]:
    """StreamBatch against a running gatecast: len(ids) // per_message streams, each a closed loop of
    `depth` messages in flight of `per_message` one-row steps; `row` is a serialized Matrix of one row.
    The sessions must be fresh (their next sequence 1) and on the benchmark model. The clients' CPU time per
    step answered is reported, and with `server_pid` the server's (its threads' and children's, while the
    clients ran, warm-up included): figures less at the mercy of a busy machine than the rate."""
    groups = [ids[k : k + per_message] for k in range(0, len(ids) - per_message + 1, per_message)]
    ctx = mp.get_context("spawn")  # no fork of a process that has used grpc
    procs, conns, first = [], [], 0
    for n in split(len(groups), client_procs):
        parent, child = ctx.Pipe(duplex=False)
        mine = groups[first : first + n]
        first += n
        p = ctx.Process(target=_client, args=(address, mine, row, warmup, seconds, depth, child), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    cpu0 = tree_cpu_s(server_pid) if server_pid is not None else 0.0
    results: list[StreamCounts] = [
        c.recv() if c.poll(warmup + seconds + 120) else StreamCounts(errors=per_message) for c in conns
    ]
    server_cpu = tree_cpu_s(server_pid) - cpu0 if server_pid is not None else 0.0
    for p in procs:
        p.join(10)
    lat = np.asarray([x for r in results for x in r.latencies])
    answered = sum(r.answered for r in results)
    extra = {}
    if server_pid is not None and answered:
        extra = {"server_cpu_s": server_cpu, "server_cpu_us_per_step": 1e6 * server_cpu / answered}
    return {
        "streams": len(groups),
        "sessions_per_message": per_message,
        "depth": depth,
        "session_steps_per_s": sum(r.steps for r in results) / seconds,
        "errors": sum(r.errors for r in results),
        "message_p50_ms": float(np.percentile(lat, 50) * 1000) if lat.size else float("nan"),
        "message_p99_ms": float(np.percentile(lat, 99) * 1000) if lat.size else float("nan"),
        "client_cpu_us_per_step": 1e6 * sum(r.cpu_s for r in results) / answered if answered else float("nan"),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--streams",
        type=int,
        nargs="+",
        default=STREAMS,
        help="streams (a gateway's connections), one set of points each; see STREAMS",
    )
    ap.add_argument("--per-message", type=int, default=64, help="sessions (one step each) per message")
    ap.add_argument("--client-procs", type=int, default=1)
    ap.add_argument(
        "--depth",
        type=int,
        nargs="+",
        default=DEPTHS,
        help="messages in flight per stream (a gateway pipelines), one point each; see DEPTHS",
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_batch.json")
    a = ap.parse_args()

    repo = bench_repo()
    folder = repo / MODEL / "1"
    m = Manifest.read(folder)
    n = max(a.streams) * a.per_message
    total = sum(a.streams) * a.per_message * len(a.depth)  # fresh sessions for every point, none closed
    env = {"GATECAST_MAX_SESSIONS": str(total + 10), "GATECAST_MAX_QUEUE_SIZE": str(n + 1024)}
    row = pb.Matrix(rows=1, cols=1, values=[float(m.scaler.mean[0])]).SerializeToString()
    proc, port = start_server(repo, env)
    points, ceilings = [], []
    beside = min(a.seconds, CEILING_S)
    try:
        address = f"127.0.0.1:{port}"
        ceilings.append(ort_ceiling(folder, a.per_message, 1, beside)["items_per_s"])
        for streams in a.streams:
            for depth in a.depth:  # fresh sessions for each point (their next sequence is 1)
                ids = open_sessions(address, streams * a.per_message)
                points.append(
                    stream_batch_point(
                        address, ids, row, a.per_message, a.client_procs, a.seconds, a.warmup, proc.pid, depth
                    )
                )
                # the ceiling again, right after the point: the one before and this one bracket it
                ceilings.append(ort_ceiling(folder, a.per_message, 1, beside)["items_per_s"])
    finally:
        stop(proc)  # type: ignore[arg-type]
    ort = ort_ceiling(folder, a.per_message, 1, min(a.seconds, 5.0))
    for k, point in enumerate(points):
        point["onnxruntime_beside_per_s"] = (ceilings[k] + ceilings[k + 1]) / 2
    result = {
        "model": f"{m.name} ({m.cell} {m.layers}x{m.hidden_size}, horizon {m.horizon})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; client ({a.client_procs} process(es)) and server "
        "share them",
        "load_average_before": os.getloadavg()[0],
        "server_settings": f"defaults, {env}",
        "event_loop": loops.resolve(os.environ.get("GATECAST_EVENT_LOOP", "auto")),
        "seconds": a.seconds,
        "stream_batch": points,
        "onnxruntime_in_process": ort,
        "onnxruntime_beside_each_point_per_s": ceilings,
        # each point over the mean of the ceilings measured just before and just after it: this machine's
        # speed drifts by up to 1.5x over minutes, and a ratio should not depend on when the ceiling was taken
        "ratio_to_onnxruntime": [p["session_steps_per_s"] / p["onnxruntime_beside_per_s"] for p in points],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["model"], "|", result["machine"])
    print(
        f"{'':<36}{'steps/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'server us':>11}{'client us':>11}{'of ort':>8}"
    )
    for point, ratio in zip(points, result["ratio_to_onnxruntime"], strict=True):
        label = f"StreamBatch {point['streams']} x {a.per_message}/message, depth {point['depth']}"
        print(
            f"{label:<36}{point['session_steps_per_s']:>10.0f}{point['message_p50_ms']:>9.2f}"
            f"{point['message_p99_ms']:>9.2f}{point['errors']:>8}{point.get('server_cpu_us_per_step', 0.0):>11.1f}"
            f"{point['client_cpu_us_per_step']:>11.1f}{ratio:>8.2f}"
        )
    print(f"{'onnxruntime alone, batch ' + str(a.per_message) + ', at end':<36}{ort['items_per_s']:>10.0f}")
    print(f"{'  (beside the points: ' + ', '.join(f'{c:.0f}' for c in ceilings) + ')'}")
    print(
        "server us / client us: CPU per step answered (all threads); of ort: steps/s over onnxruntime's, measured\n"
        "in process just before and just after the point (their mean)"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
