"""The benchmark's client: closed loops of gRPC calls with pre-serialized bytes (grpc's generic callables,
no serializers), so that neither side's protobuf version matters and every server is driven alike. Each
client process runs one `Load` (pickled on stdin, its counts pickled to stdout); benchmarks/throughput.py
starts them and merges the answers. It imports no more than grpc, so that a client process starts quickly.

    python -m benchmarks.bytes_client < load.pickle > result.pickle
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc


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
    rows: bytes = b""  # a serialized Matrix of one row, for stream messages
    start_at: float = 0.0  # time.time() at which every client process begins


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def observe_bytes(session_id: str, seq: int, rows: bytes) -> bytes:
    """An ObserveRequest's wire form, written directly (session_id = 1, sequence = 2, rows = 3)."""
    sid = session_id.encode()
    return b"\x0a" + _varint(len(sid)) + sid + b"\x10" + _varint(seq) + b"\x1a" + _varint(len(rows)) + rows


def stream_error(reply: bytes) -> bool:
    """Whether a StreamResponse carries an error (field 4) rather than a forecast (field 3): read from the
    bytes without protobuf, so that checking costs every server the same."""
    pos = 0
    while pos < len(reply):
        tag = reply[pos]
        pos += 1
        if tag >> 3 in (3, 4):
            return tag >> 3 == 4
        if tag & 7 == 0:  # varint
            while reply[pos] & 0x80:
                pos += 1
            pos += 1
        elif tag & 7 == 2:  # length-delimited (lengths here are below 128)
            pos += 1 + reply[pos]
        else:
            return True
    return True


async def _drive(load: Load) -> tuple[int, int, list[float]]:
    """Returns (answers counted, errors, latencies in s) for the measured window."""
    channels = [grpc.aio.insecure_channel(load.address) for _ in range(max(1, min(load.channels, load.concurrency)))]
    for c in channels:
        await asyncio.wait_for(c.channel_ready(), 30)
    await asyncio.sleep(max(0.0, load.start_at - time.time()))
    t0 = time.perf_counter()
    begin, end = t0 + load.warmup, t0 + load.warmup + load.seconds
    lat: list[float] = []
    errors = 0

    async def unary(i: int) -> None:
        nonlocal errors
        call = channels[i % len(channels)].unary_unary(load.method)  # no serializers: bytes both ways
        k = i
        while (t := time.perf_counter()) < end:
            try:
                await call(load.payloads[k % len(load.payloads)], timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
            done = time.perf_counter()
            if t >= begin and done <= end:
                lat.append(done - t)
            k += load.concurrency

    async def stream(i: int) -> None:
        nonlocal errors
        mine = load.sessions[i]
        out: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def send() -> AsyncIterator[bytes]:
            while (m := await out.get()) is not None:
                yield m

        call = channels[i % len(channels)].stream_stream(load.method)(send())
        seq = 0
        while (t := time.perf_counter()) < end:
            seq += 1
            for sid in mine:
                out.put_nowait(observe_bytes(sid, seq, load.rows))
            for _ in mine:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    errors += 1
                    return
                if stream_error(reply):
                    errors += 1
                done = time.perf_counter()
                if t >= begin and done <= end:
                    lat.append(done - t)
        out.put_nowait(None)
        while await call.read() is not grpc.aio.EOF:
            pass

    work = stream if load.sessions else unary
    await asyncio.gather(*(work(i) for i in range(load.concurrency)))
    for c in channels:
        await c.close()
    return len(lat), errors, lat


if __name__ == "__main__":
    answered = asyncio.run(_drive(pickle.load(sys.stdin.buffer)))
    sys.stdout.buffer.write(pickle.dumps(answered))
