"""Forecast workers: processes beside the main one that answer unary Forecast requests.

The main process runs the event loop, grpc, sessions and the batchers of every model version under one
GIL; a one-shot Forecast needs none of its state. The servicer resolves a Forecast's model and version
from the request's first bytes (service.oneshot.forecast_head) and hands the request's bytes to a worker
as they are; the worker decodes and checks them with the same code as the main process, batches them with
its other requests in its own Batcher, runs onnxruntime and sends back the ForecastResponse's bytes (or
the status and message of a refusal), which the main process sends on as they are.

Each worker is `python -m gatecast.service.forecast_worker FD LOOP` (LOOP: the main process's kind of event
loop), started with spawn semantics (fork and exec: nothing of the main process's grpc threads is
inherited), joined to the main process by a Unix socket pair read by the event loop. Frames are HEAD (kind,
id, arg, deadline, length) and `length` bytes; frames written during one pass of the event loop go in one
write.

- Models follow the repository: after each scan the main process tells the workers which versions to
  load (folder and the graph's sha256) and which to drop. A request goes to a worker only for a version
  that worker has confirmed loading with the same graph; anything else runs in the main process.
- At most `max_queue_size` requests are in one worker at a time; beyond that they run in the main process,
  whose batch queue refuses them RESOURCE_EXHAUSTED when full, as without workers.
- A caller that goes away (cancel, deadline) cancels its request in the worker; the worker drops what is
  past its deadline, like the main process's batcher.
- A worker that owes answers and sends none for `forecast_worker_stall_s` (hung, or stopped) is killed: a
  request without a deadline must not wait on it for ever. Every request sent gets exactly one ANSWER frame
  back, a cancelled one too (the worker acknowledges the cancel), so a worker that only ever sees requests
  whose callers gave up first is still found out.
- A worker serves a version only with the manifest the main process loaded (sent with the load and compared
  with what the worker reads), so a manifest edited on disk after the main process loaded it cannot make a
  restarted worker answer differently.
- A worker that exits answers the requests it held UNAVAILABLE (a request that crashed its worker must not
  be retried in the process holding every session) and is started again, after a backoff that doubles
  while workers keep dying young; meanwhile Forecasts run in the main process.
- The worker's batch metrics (queue wait, model run time, batch size and rows, queue rejections) are sent
  to the main process about twice a second and counted in its series for the model version; its queued
  rows are not (gatecast_queued_rows is the main process's queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from . import loops
from .errors import MalformedRequest, ServiceError, Unavailable
from .metrics import Metrics, observe_many
from .repository import ModelVersion
from .settings import Settings

log = logging.getLogger(__name__)

HEAD = struct.Struct("<BIIdI")  # kind, id, arg, deadline (time.monotonic(); < 0: none), payload length
# main -> worker
HELLO, FORECAST, CANCEL, LOAD, UNLOAD = 0, 1, 2, 3, 4
# worker -> main (ANSWER's arg: 0 or a grpc status code's value, or UNDECODABLE)
ANSWER, LOADED, BATCHES = 1, 3, 5
UNDECODABLE = 255
NO_DEADLINE = -1.0
ID_LIMIT = 2**32 - 1  # request ids fill HEAD's unsigned 32-bit field
READ_SIZE = 1 << 18
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
YOUNG_S = 10.0  # a worker that dies younger than this doubles the backoff before the next one
STOP_WAIT_S = 10.0  # on close: how long a worker has to finish and exit before it is killed

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class Refused(ServiceError):
    """A worker's refusal: its status code and message, as the main process would have answered."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Undecodable(MalformedRequest):
    """The worker could not decode the request's series (the main process counts it as malformed)."""


def worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the folder gatecast is imported from first on the path."""
    import gatecast

    root = str(Path(gatecast.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class Channel:
    """Frames over a non-blocking stream socket, driven by the event loop: `send` queues a frame and the
    frames queued during one pass of the loop go in one write; each frame read is handed to `on_frame`,
    the end of the input (or a failed read) to `on_end`, once. Frames can still be sent after the end of
    the input, until `close`."""

    def __init__(
        self,
        sock: socket.socket,
        on_frame: Callable[[int, int, int, float, bytes], None],
        on_end: Callable[[], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.on_frame, self.on_end = on_frame, on_end
        self.open = True  # the socket is open
        self.reading = True  # and its input has not ended
        self._out: list[bytes] = []
        self._unsent = b""  # what a full socket did not take
        self._flushing = False
        self._buf = bytearray()
        self.loop.add_reader(self.fd, self._readable)

    def send(self, kind: int, ident: int, arg: int, deadline: float = NO_DEADLINE, payload: bytes = b"") -> None:
        self._out.append(HEAD.pack(kind, ident, arg, deadline, len(payload)))
        if payload:
            self._out.append(payload)
        if not self._flushing:
            self._flushing = True
            self.loop.call_soon(self.flush)

    @property
    def unsent(self) -> bool:
        return bool(self._out or self._unsent)

    def flush(self) -> None:
        self._flushing = False
        if not self.open:
            self._out.clear()
            return
        if not self._out and not self._unsent:
            return
        blocked = bool(self._unsent)  # a writer callback is waiting for room
        data = self._unsent + b"".join(self._out)
        self._out.clear()
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # the other end has gone: the reader sees it too
            n = len(data)
        self._unsent = data[n:]
        if self._unsent and not blocked:
            self.loop.add_writer(self.fd, self._writable)
        elif not self._unsent and blocked:
            self.loop.remove_writer(self.fd)

    def _writable(self) -> None:
        if not self._flushing:
            self.flush()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        buf = self._buf
        buf += data
        pos, size, end = 0, HEAD.size, len(buf)
        on_frame = self.on_frame
        while end - pos >= size:
            kind, ident, arg, deadline, n = HEAD.unpack_from(buf, pos)
            if end - pos - size < n:
                break
            on_frame(kind, ident, arg, deadline, bytes(buf[pos + size : pos + size + n]))
            pos += size + n
            if not self.reading:
                return
        del buf[:pos]

    def _end(self) -> None:
        if not self.reading:
            return
        self.reading = False
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)
        self.on_end()

    def shutdown(self) -> None:
        """Nothing more to send: the other end reads the end of its input once what is queued has gone."""
        self.flush()
        if self._unsent:  # a full socket: try again shortly (the other end is still reading)
            self.loop.call_later(0.01, self.shutdown)
            return
        if self.open:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    async def drain(self) -> None:
        """Waits until everything queued has been written (or the socket has failed)."""
        while self.open and self.unsent:
            self.flush()
            if self.unsent:
                await asyncio.sleep(0.005)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.reading = False
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.fd)
        self.sock.close()


class _Worker:
    """The main process's end of one worker: its process, channel, requests in flight and loaded versions."""

    def __init__(self, pool: ForecastPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gatecast.service.forecast_worker",
                    str(theirs.fileno()),
                    loops.kind(self.loop),  # the main process's kind of loop
                ],
                pass_fds=(theirs.fileno(),),
                env=worker_env(),
                stdin=subprocess.DEVNULL,
                # a process group of its own: a Ctrl-C (SIGINT to the terminal's foreground group) reaches the
                # main process only, which drains and then closes the worker's socket; a worker still importing
                # would die of it before it ignores the signals
                process_group=0,
            )
        finally:
            theirs.close()
        self.started = time.monotonic()
        self._next_id = 0
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.owed = 0  # requests sent and not yet answered, cancelled ones included (the stall watchdog's count)
        self.ready: dict[ModelVersion, int] = {}  # versions it has loaded, with their key
        self.asked: dict[int, ModelVersion] = {}  # key -> version, loads sent and not yet confirmed
        self.failed: set[int] = set()  # keys it could not load: not asked again (their Forecasts stay here)
        self.closing = False
        self.busy_since = self.last_answer = self.started  # for the stall watchdog
        self.gone: asyncio.Future[None] = self.loop.create_future()  # resolves when the channel has closed
        self.channel = Channel(ours, self._frame, self._lost)
        self.channel.send(HELLO, 0, 0, NO_DEADLINE, pool.settings.model_dump_json().encode())

    @property
    def alive(self) -> bool:
        return self.channel.reading

    def next_id(self) -> int:
        """A request id for the frame's 32-bit field: 1, 2, ... and round again after 2**32 - 1 (ids in
        flight at once number at most max_queue_size)."""
        self._next_id = self._next_id % ID_LIMIT + 1
        return self._next_id

    def _frame(self, kind: int, ident: int, arg: int, deadline: float, payload: bytes) -> None:
        if kind == ANSWER:
            self.last_answer = time.monotonic()
            self.owed = max(0, self.owed - 1)
            fut = self.pending.pop(ident, None)
            if fut is not None and not fut.done():
                fut.set_result((arg, payload))
        elif kind == LOADED:
            self._loaded(arg, bool(ident), payload.decode())
        elif kind == BATCHES:
            self.pool._batches(arg, payload)

    def _loaded(self, key: int, ok: bool, error: str) -> None:
        mv = self.asked.pop(key, None)
        if mv is None:
            return
        if ok and mv in self.pool._keys:
            self.ready[mv] = key
            log.info("forecast worker %d (pid %d) serves %s v%d", self.index, self.proc.pid, mv.name, mv.version)
        elif not ok:
            self.failed.add(key)
            log.warning(
                "forecast worker %d could not load %s v%d (its Forecasts run in the main process): %s",
                self.index,
                mv.name,
                mv.version,
                error,
            )
        self.pool._check_ready()

    def _lost(self) -> None:
        """The worker's output has ended: it has exited (or is exiting). Whatever it held is answered."""
        self.channel.close()
        self.ready.clear()
        self.asked.clear()
        pending, self.pending = self.pending, {}
        if pending:
            error = Unavailable(
                f"the forecast worker process (pid {self.proc.pid}) ended while this request was in it; retry"
            )
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(error)
        if not self.gone.done():
            self.gone.set_result(None)
        self.pool._lost(self)

    def close(self) -> None:
        """No more work: the worker finishes what it holds and exits."""
        self.closing = True
        if self.alive:
            self.channel.shutdown()


class ForecastPool:
    def __init__(self, settings: Settings, metrics: Metrics, workers: int) -> None:
        self.settings = settings
        self.metrics = metrics
        self.size = workers
        self.limit = settings.max_queue_size  # requests in one worker at a time
        self.workers: list[_Worker] = []
        self._keys: dict[ModelVersion, int] = {}  # the versions the workers should hold
        self._by_key: dict[int, ModelVersion] = {}
        self._next_key = itertools.count(1)
        self._batch_series: dict[int, tuple[Any, ...]] = {}
        self._to_worker = metrics.forecast_path.labels("worker")
        self._restarts: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._closed = False
        self._backoff = BACKOFF_FIRST_S
        self.stall_s = settings.forecast_worker_stall_s
        self._watchdog: asyncio.Task[None] | None = None

    def start(self, versions: list[ModelVersion]) -> None:
        for i in range(self.size):
            self.workers.append(_Worker(self, i))
        self.metrics.forecast_workers.set(0)
        self.follow(versions)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="forecast-worker-watchdog")

    async def _watch(self) -> None:
        """Kills a worker that holds requests and has answered none for `stall_s`: its requests are answered
        UNAVAILABLE when its output ends, and another worker is started (`_lost`)."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            now = time.monotonic()
            for w in self.workers:
                quiet = now - max(w.busy_since, w.last_answer)
                if w.alive and w.owed and not w.closing and quiet > self.stall_s:
                    log.error(
                        "forecast worker %d (pid %d) answered none of its %d request(s) for %.1f s "
                        "(GATECAST_FORECAST_WORKER_STALL_S): killed",
                        w.index,
                        w.proc.pid,
                        w.owed,
                        quiet,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()

    def follow(self, versions: list[ModelVersion]) -> None:
        """After a repository scan: every worker loads the versions served and drops the others."""
        served = set(versions)
        for mv in versions:
            if mv not in self._keys:
                key = next(self._next_key)
                self._keys[mv] = key
                self._by_key[key] = mv
        for mv in [mv for mv in self._keys if mv not in served]:
            key = self._keys.pop(mv)
            del self._by_key[key]
            self._batch_series.pop(key, None)
            for w in self.workers:
                w.ready.pop(mv, None)
                w.asked.pop(key, None)
                w.failed.discard(key)
                if w.alive:
                    w.channel.send(UNLOAD, 0, key, NO_DEADLINE)
        for w in self.workers:
            if w.alive:
                self._ask(w)
        self._check_ready()

    def _ask(self, w: _Worker) -> None:
        for mv, key in self._keys.items():
            if mv in w.ready or key in w.asked or key in w.failed:
                continue
            w.asked[key] = mv
            m = mv.runtime.manifest
            spec = {"folder": str(mv.runtime.path), "manifest": m.model_dump_json()}
            w.channel.send(LOAD, 0, key, NO_DEADLINE, json.dumps(spec).encode())

    def _check_ready(self) -> None:
        ready = [w for w in self.workers if w.alive and not w.asked]  # every load answered
        self.metrics.forecast_workers.set(sum(w.alive for w in self.workers))
        if len(ready) == self.size:
            self._ready.set()
        else:
            self._ready.clear()

    async def ready(self, timeout: float) -> bool:
        """Whether every worker is up and holds every version served, waiting up to `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._ready.is_set()

    async def forecast(self, mv: ModelVersion, data: bytes, deadline: float | None) -> bytes | None:
        """The ForecastResponse's bytes from a worker; None when no worker takes this version now (the caller
        runs it in this process). A worker's refusal raises, with its status and message."""
        best = None
        for w in self.workers:
            if mv in w.ready and len(w.pending) < self.limit and (best is None or len(w.pending) < len(best.pending)):
                best = w
        if best is None:
            return None
        w = best
        ident = w.next_id()
        fut: asyncio.Future[tuple[int, bytes]] = w.loop.create_future()
        if not w.owed:
            w.busy_since = time.monotonic()
        w.pending[ident] = fut
        w.owed += 1
        w.channel.send(FORECAST, ident, w.ready[mv], NO_DEADLINE if deadline is None else deadline, data)
        self._to_worker.inc()
        try:
            code, payload = await fut
        except asyncio.CancelledError:
            if w.pending.pop(ident, None) is not None and w.alive:
                w.channel.send(CANCEL, ident, 0, NO_DEADLINE)
            raise
        if code == 0:
            return payload
        if code == UNDECODABLE:
            raise Undecodable(payload.decode())
        raise Refused(_CODES.get(code, grpc.StatusCode.INTERNAL), payload.decode())

    def _batches(self, key: int, payload: bytes) -> None:
        """A worker's batch metrics for a version, counted in the main process's series."""
        mv = self._by_key.get(key)
        if mv is None:  # dropped since
            return
        series = self._batch_series.get(key)
        if series is None:
            m, labels = self.metrics, (mv.name, str(mv.version))
            series = self._batch_series[key] = tuple(
                h.labels(*labels) for h in (m.queue_wait, m.model_run, m.batch_size, m.batch_rows)
            )
        counts = np.frombuffer(payload, "<u4", 5)
        values = np.frombuffer(payload, "<f8", offset=20).tolist()
        at = 0
        for hist, n in zip(series, counts[:4].tolist(), strict=True):
            observe_many(hist, values[at : at + n])  # one pass per series: about 2,000 values a second each
            at += n
        if counts[4]:
            self.metrics.queue_rejected.labels(mv.name, str(mv.version)).inc(int(counts[4]))

    def _lost(self, w: _Worker) -> None:
        self._check_ready()
        if self._closed or w.closing:
            return
        lived = time.monotonic() - w.started
        self._backoff = min(BACKOFF_MAX_S, self._backoff * 2) if lived < YOUNG_S else BACKOFF_FIRST_S
        task = asyncio.get_running_loop().create_task(self._restart(w, self._backoff), name="forecast-worker-restart")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, w: _Worker, delay: float) -> None:
        try:
            code = await asyncio.wait_for(asyncio.to_thread(w.proc.wait), STOP_WAIT_S)
        except TimeoutError:  # its output ended but it lives on: it cannot be used any more
            w.proc.kill()
            code = await asyncio.to_thread(w.proc.wait)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.error(
            "forecast worker %d (pid %d) ended (%s); Forecasts run in the main process until another one is up "
            "(starting in %.1f s)",
            w.index,
            w.proc.pid,
            how,
            delay,
        )
        self.metrics.forecast_worker_restarts.inc()
        await asyncio.sleep(delay)
        if self._closed:
            return
        fresh = _Worker(self, w.index)
        self.workers[self.workers.index(w)] = fresh
        self._ask(fresh)
        self._check_ready()

    async def close(self) -> None:
        """Lets each worker finish what it holds and exit (killed after STOP_WAIT_S), and reaps it."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._restarts):
            task.cancel()
        for w in self.workers:
            w.close()
        for w in self.workers:
            try:
                await asyncio.wait_for(asyncio.shield(w.gone), STOP_WAIT_S)
                code = await asyncio.wait_for(asyncio.to_thread(w.proc.wait), STOP_WAIT_S)
            except TimeoutError:
                log.error("forecast worker %d (pid %d) did not exit: killed", w.index, w.proc.pid)
                w.proc.kill()
                code = await asyncio.to_thread(w.proc.wait)
                w.channel.close()
            log.info("forecast worker %d (pid %d) stopped (exit code %d)", w.index, w.proc.pid, code)
        self._check_ready()
