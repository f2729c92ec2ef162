"""The benchmark's Python client: closed loops of gRPC calls with pre-serialized bytes (grpc's generic
callables, no serializers), so that neither side's protobuf version matters and every server is driven
alike. Each client process runs one `Load` (pickled on stdin, its counts pickled to stdout);
benchmarks/throughput.py starts them and merges the answers. It imports no more than grpc, so that a client
process starts quickly.

What a call costs the client here is grpc.aio's own work (about 370 us of CPU per unary call, 175 us per
stream message on this machine's cores): the loops add little to it. A stream message is a session's
pre-built head, the sequence's varint and the pre-built rows (no encoder); an answer is checked by reading
its first fields' tags (no protobuf); writes go straight to the call (no queue, no request generator);
there is no per-call deadline timer (the whole run has one). Each process reports its own CPU time, so
that the harness can say what the client cost beside what the server did.

    python -m benchmarks.bytes_client < load.pickle > result.pickle
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from dataclasses import dataclass, field

import grpc

WATCHDOG_S = 120.0  # beyond warm-up + seconds: a server that stops answering ends the run, as errors


@dataclass
class Load:
    """What one client process does: `concurrency` closed loops over `payloads` for warm-up + seconds."""

    address: str
    method: str
    payloads: list[bytes]
    concurrency: int
    seconds: float
    warmup: float
    channels: int = 4
    # streaming: `concurrency` streams, each carrying these session ids (one row each per round)
    sessions: list[list[str]] = field(default_factory=list)
    rows: bytes = b""  # a serialized Matrix of one row, for stream messages and stepped sessions
    start_at: float = 0.0  # time.time() at which every client process begins
    # unary Observe: loop i steps session stepping[i] (one row a call, sequence 1, 2, ...) instead of payloads
    stepping: list[str] = field(default_factory=list)


@dataclass
class Counts:
    """One client process's answer: calls (stream messages) answered well inside the measured window, errors
    (anywhere in the run), latencies inside the window (s), and the process's CPU time over the whole run
    beside the calls answered over it (warm-up included)."""

    answered: int
    errors: int
    latencies: list[float]
    cpu_s: float = 0.0
    answered_all: int = 0


def varint(n: int) -> bytes:
    """An unsigned integer's protobuf wire form."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, pos


def observe_head(session_id: str) -> bytes:
    """An ObserveRequest's bytes up to its sequence's value: session_id (field 1), then field 2's tag."""
    sid = session_id.encode()
    return b"\x0a" + varint(len(sid)) + sid + b"\x10"


def rows_field(rows: bytes) -> bytes:
    """An ObserveRequest's rows (field 3, a serialized Matrix) with its tag and length."""
    return b"\x1a" + varint(len(rows)) + rows


def observe_bytes(session_id: str, seq: int, rows: bytes) -> bytes:
    """An ObserveRequest's wire form, written directly (session_id = 1, sequence = 2, rows = 3)."""
    return observe_head(session_id) + varint(seq) + rows_field(rows)


def stream_error(reply: bytes) -> bool:
    """Whether a StreamResponse carries an error (field 4) rather than a forecast (field 3): read from the
    bytes without protobuf, so that checking costs every server the same. Anything else (no result, an
    unknown wire type, a truncated message) counts as an error."""
    pos, end = 0, len(reply)
    try:
        while pos < end:
            tag = reply[pos]
            pos += 1
            if tag >> 3 in (3, 4):
                return tag >> 3 == 4 or tag & 7 != 2
            if tag & 7 == 0:  # varint
                while reply[pos] & 0x80:
                    pos += 1
                pos += 1
            elif tag & 7 == 2:  # length-delimited
                n, pos = read_varint(reply, pos)
                pos += n
            else:
                return True
    except IndexError:
        return True
    return True


async def _drive(load: Load) -> Counts:
    channels = [grpc.aio.insecure_channel(load.address) for _ in range(max(1, min(load.channels, load.concurrency)))]
    for c in channels:
        await asyncio.wait_for(c.channel_ready(), 30)
    await asyncio.sleep(max(0.0, load.start_at - time.time()))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    begin, end = t0 + load.warmup, t0 + load.warmup + load.seconds
    lat: list[float] = []
    errors = answered_all = 0

    async def unary(i: int) -> None:
        nonlocal errors, answered_all
        call = channels[i % len(channels)].unary_unary(load.method)  # no serializers: bytes both ways
        payloads, k, step = load.payloads, i, load.concurrency
        head, tail = (observe_head(load.stepping[i]), rows_field(load.rows)) if load.stepping else (b"", b"")
        clock = time.perf_counter
        while (t := clock()) < end:
            k += step
            try:
                await call(head + varint(k // step) + tail if head else payloads[k % len(payloads)])
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            done = clock()
            answered_all += 1
            if t >= begin and done <= end:
                lat.append(done - t)

    async def stream(i: int) -> None:
        nonlocal errors, answered_all
        heads = [observe_head(sid) for sid in load.sessions[i]]
        tail = rows_field(load.rows)
        call = channels[i % len(channels)].stream_stream(load.method)()  # written to directly
        clock = time.perf_counter
        seq = 0
        while (t := clock()) < end:
            seq += 1
            v = varint(seq)
            for head in heads:
                await call.write(head + v + tail)
            for _ in heads:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    errors += 1
                    return
                if stream_error(reply):
                    errors += 1
                    continue
                done = clock()
                answered_all += 1
                if t >= begin and done <= end:
                    lat.append(done - t)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass

    work = stream if load.sessions else unary
    tasks = asyncio.gather(*(work(i) for i in range(load.concurrency)))
    try:
        await asyncio.wait_for(tasks, load.warmup + load.seconds + WATCHDOG_S)
    except TimeoutError:
        errors += load.concurrency  # every loop still waiting on an answer
    cpu = time.process_time() - cpu0
    for c in channels:
        await c.close()
    return Counts(len(lat), errors, lat, cpu, answered_all)


if __name__ == "__main__":
    counts = asyncio.run(_drive(pickle.load(sys.stdin.buffer)))
    sys.stdout.buffer.write(pickle.dumps(tuple(vars(counts).values())))  # Counts(*these): __main__ has no name
