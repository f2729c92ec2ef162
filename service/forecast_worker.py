"""A forecast worker process (service.forecast_pool): `python -m gatecast.service.forecast_worker FD LOOP`,
on an event loop of the kind LOOP names (service.loops; the main process's own).

It reads frames from the main process on socket FD: the settings first, then versions to load or drop and
Forecast requests as their bytes. Each request is decoded and checked as in the main process
(service.oneshot: read from the wire when it is laid out plainly and passes every check, else by protobuf and
forecast_inputs, which refuse it with the main process's words) and answered with the ForecastResponse's
bytes or the status and message of its refusal.

A request whose series each run in one piece (at most chunk_rows rows) takes the lean path: it waits in its
model's line and its series run in this thread (onnxruntime releases the GIL) as batches bounded as the
batcher bounds a run (max_batch_size series, max_batch_rows rows; one onnxruntime run per series length) and
shared as the batcher shares them (requests in turn, each at most half a batch while others wait, so a small
request is not held behind a big one's many batches),
after the frames of the current read have been taken, so what arrives during a run forms the next batch
(no waiting for more: an idle worker runs a lone request at once). Deadlines, cancels, failed runs and the
batch metrics are kept as the batcher keeps them. A longer request goes to a Batcher of its version, which
runs it in chunks in its own thread, so it holds the small ones up for no more than one bounded run.

The end of its input (the main process is stopping, or gone) makes it finish what it holds, answer it, and
exit.

It runs in a process group of its own (a Ctrl-C reaches the main process only) and ignores SIGINT, SIGTERM
and SIGHUP: a service manager may signal every process of the service, and the main process, which drains
on those, decides when its workers stop (by closing their input)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import struct
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np

from gatecast.v1 import forecaster_pb2 as pb

from . import loops
from .batcher import PAST_DEADLINE, Batcher, Output
from .convert import Malformed
from .errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from .forecast_pool import ANSWER, BATCHES, CANCEL, FORECAST, HELLO, LOAD, LOADED, UNDECODABLE, UNLOAD, Channel
from .metrics import Metrics
from .oneshot import forecast_inputs, forecast_response, forecast_response_bytes, forecast_series
from .pool import StatePool
from .runtime import ModelRuntime
from .settings import Settings

log = logging.getLogger("gatecast.service.forecast_worker")

METRICS_EVERY_S = 0.5
_REQUEST = pb.ForecastRequest.DESCRIPTOR.full_name
_INTERNAL = 13  # grpc.StatusCode.INTERNAL
_CANCELLED = 1  # grpc.StatusCode.CANCELLED


class _Record:
    """Stands in for a metric's labelled child: keeps what the batcher records until it is sent."""

    __slots__ = ("count", "values")

    def __init__(self) -> None:
        self.values: list[float] = []
        self.count = 0

    def labels(self, *_: str) -> _Record:
        return self

    def observe(self, value: float) -> None:
        self.values.append(value)

    def inc(self, n: int = 1) -> None:
        self.count += n

    def set(self, value: float) -> None:
        pass  # the queued rows gauge stays the main process's own


class _BatchMetrics:
    """The metrics a Batcher writes, recorded for the main process (forecast_pool.ForecastPool._batches)."""

    def __init__(self) -> None:
        self.queue_wait, self.model_run, self.batch_size, self.batch_rows = (_Record() for _ in range(4))
        self.queue_rejected, self.queued_rows = _Record(), _Record()

    def take(self) -> bytes | None:
        hists = (self.queue_wait, self.model_run, self.batch_size, self.batch_rows)
        if not any(h.values for h in hists) and not self.queue_rejected.count:
            return None
        counts = [len(h.values) for h in hists] + [self.queue_rejected.count]
        values = [v for h in hists for v in h.values]
        for h in hists:
            h.values = []
        self.queue_rejected.count = 0
        return struct.pack(f"<5I{len(values)}d", *counts, *values)


class _Lean:
    """A request on the lean path: each series fits in one piece; it waits in its model's line."""

    __slots__ = ("deadline", "enqueued", "ident", "left", "model", "next", "outs", "rows", "xs")

    def __init__(self, ident: int, model: _Model, deadline: float | None, xs: list[Any]) -> None:
        self.ident = ident
        self.model = model
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.xs = xs
        self.next = 0  # its first series not yet taken into a batch
        self.rows = sum(int(x.shape[0]) for x in xs)  # rows of its series not yet taken
        self.outs: list[Output | None] = [None] * len(xs)
        self.left = len(xs)  # series not yet run; -1: dropped (cancelled, failed, past its deadline)


@dataclass(eq=False)
class _Model:
    runtime: ModelRuntime
    batcher: Batcher
    metrics: _BatchMetrics
    held: deque[_Lean] = field(default_factory=deque)  # lean requests with series waiting to run, in turn
    held_rows: int = 0
    held_requests: int = 0


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.settings: Settings | None = None
        self.models: dict[int, _Model] = {}
        self.inflight: dict[int, list[asyncio.Future[Output]]] = {}  # request id -> its series' futures
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ended: asyncio.Event | None = None
        self.lean: dict[int, _Lean] = {}  # request id -> its lean request, until answered or dropped
        self.busy: deque[_Model] = deque()  # models with lean series held, in turn
        self.scheduled = False

    async def serve(self) -> int:
        self.ended = asyncio.Event()
        self.channel = Channel(self.sock, self._frame, self.ended.set)
        self._spawn(self._send_metrics())
        await self.ended.wait()  # the main process closed our input (or went away)
        while self.busy:  # what is held runs and is answered
            self._run_lean()
        for model in list(self.models.values()):
            await model.batcher.close()  # what is queued runs and is answered
        await asyncio.sleep(0)  # the last answers' callbacks
        self._metrics_once()
        await self.channel.drain()
        self.channel.close()
        return 0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _frame(self, kind: int, ident: int, arg: int, deadline: float, payload: bytes) -> None:
        if kind == FORECAST:
            self._forecast(ident, arg, None if deadline < 0 else deadline, payload)
        elif kind == CANCEL:
            futures = self.inflight.pop(ident, None)
            for fut in futures or ():
                fut.cancel()  # the batcher drops a cancelled item before it runs
            lean = self.lean.pop(ident, None)
            if lean is not None:
                self._drop(lean)  # its series are skipped when their turn comes
            if futures is not None or lean is not None:  # not answered yet: acknowledged, so each request sent
                self.channel.send(ANSWER, ident, _CANCELLED, payload=b"cancelled")  # gets one answer (stall watch)
        elif kind == HELLO:
            self.settings = Settings.model_validate_json(payload)
        elif kind == LOAD:
            self._spawn(self._load(arg, json.loads(payload)))
        elif kind == UNLOAD:
            model = self.models.pop(arg, None)
            if model is not None:
                self._spawn(model.batcher.close())

    async def _load(self, key: int, spec: dict[str, Any]) -> None:
        assert self.settings is not None
        s = self.settings
        try:
            runtime = await asyncio.to_thread(ModelRuntime.load, Path(spec["folder"]), s)
            m = runtime.manifest
            # compared as the same serialisation (the graph's sha256 is in it: a replaced graph differs too); as
            # JSON text, not parsed, since a score may be NaN or infinity (written as null) and NaN != NaN
            ours, served = m.model_dump_json(), spec["manifest"]
            if ours != served:
                a, b = json.loads(ours), json.loads(served)
                changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                raise RuntimeError(
                    f"{spec['folder']} holds a manifest for {m.name} v{m.version} that differs from the one the "
                    f"main process serves (changed on disk since it loaded: {', '.join(changed)})"
                )
        except Exception as e:
            self.channel.send(LOADED, 0, key, payload=str(e).encode())
            return
        metrics = _BatchMetrics()
        pool = StatePool(m.states, 1, 1)  # one-shot forecasts start from zero states: no session slots
        batcher = Batcher(
            runtime, pool, cast(Metrics, metrics), s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size
        )
        batcher.start()
        self.models[key] = _Model(runtime, batcher, metrics)
        self.channel.send(LOADED, 1, key)

    def _forecast(self, ident: int, key: int, deadline: float | None, data: bytes) -> None:
        model = self.models.get(key)
        if model is None:  # dropped while the request was on its way
            self._refuse(ident, Unavailable("the model version was unloaded while the request was queued; retry"))
            return
        assert self.settings is not None
        s, batcher = self.settings, model.batcher
        xs = forecast_series(
            data, model.runtime.manifest.n_features, s.max_series, s.max_rows, batcher.max_request_rows
        )
        if xs is None:  # anything unusual, or a refusal: protobuf and forecast_inputs say what is wrong
            try:
                request = pb.ForecastRequest.FromString(data)
            except Exception as e:
                message = Malformed(_REQUEST, str(e) or type(e).__name__).problem().message
                self.channel.send(ANSWER, ident, UNDECODABLE, payload=message.encode())
                return
            try:
                xs = forecast_inputs(request, model.runtime.manifest, batcher, s)
            except Exception as e:
                self._refuse(ident, e)
                return
        if all(x.shape[0] <= batcher.chunk_rows for x in xs):
            self._hold(ident, model, deadline, xs)
            return
        try:
            futures = batcher.submit_many(xs, None, deadline)
        except Exception as e:
            self._refuse(ident, e)
            return
        self.inflight[ident] = futures
        if len(futures) == 1:
            futures[0].add_done_callback(partial(self._done, ident, model, futures))
        else:
            asyncio.gather(*futures).add_done_callback(partial(self._done, ident, model, futures))

    def _hold(self, ident: int, model: _Model, deadline: float | None, xs: list[Any]) -> None:
        """The lean path: a request whose series each run in one piece waits, series by series, in its
        model's line; `_run_lean` runs what is held as batches in this thread, after the frames of the
        current read have been taken (what arrives during a run forms the next batch)."""
        lean = _Lean(ident, model, deadline, xs)
        try:  # the lean line and the batcher's share its bounds
            model.batcher.admit(lean.rows, model.held_rows, model.held_requests)
        except ResourceExhausted as e:
            self._refuse(ident, e)
            return
        self.lean[ident] = lean
        model.held.append(lean)
        model.held_rows += lean.rows
        model.held_requests += 1
        if len(model.held) == 1:  # the line was empty
            self.busy.append(model)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._run_lean)

    def _drop(self, lean: _Lean) -> None:
        if lean.left >= 0:
            lean.left = -1
            lean.model.held_requests -= 1

    def _run_lean(self) -> None:
        """Runs one batch of the next model's held series and sends their answers; again (after the loop has
        read what came meanwhile) while series are held. One batch is bounded as the batcher bounds a run:
        at most max_batch_size series and max_batch_rows rows."""
        self.scheduled = False
        if not self.busy:
            return
        model = self.busy.popleft()
        try:
            self._run_batch(model)
        except Exception:  # keep serving: what was taken has been answered or dropped
            log.exception("forecast run failed for %s", model.runtime.path)
        if model.held:
            self.busy.append(model)
        self.channel.flush()  # the answers go now, before the next batch runs
        if self.busy and not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._run_lean)

    def _run_batch(self, model: _Model) -> None:
        """One batch from the model's line, taken as the batcher takes one (`Batcher._take`): requests in
        turn, in a first pass each at most half of the batch's series and rows, then what is left to fill it;
        a request partly taken goes to the back of the line."""
        b, held, metrics = model.batcher, model.held, model.metrics
        batch: list[tuple[_Lean, int, Any]] = []
        rows = 0
        now = time.monotonic()
        quota_rows, quota_items = b.fair_share
        for quota in (True, False):
            rotated: list[_Lean] = []
            for _ in range(len(held)):
                if len(batch) >= b.max_batch_size or rows >= b.max_batch_rows:
                    break
                lean = held.popleft()
                if lean.left < 0:  # dropped: its series are not run
                    model.held_rows -= lean.rows
                    continue
                if lean.deadline is not None and now > lean.deadline:
                    model.held_rows -= lean.rows
                    self._fail(lean, DeadlineExceeded(PAST_DEADLINE))
                    continue
                taken = taken_rows = 0
                while lean.next < len(lean.xs) and len(batch) < b.max_batch_size:
                    x = lean.xs[lean.next]
                    n = int(x.shape[0])
                    if quota and taken and (taken_rows + n > quota_rows or taken >= quota_items):
                        break
                    if batch and rows + n > b.max_batch_rows:
                        break
                    batch.append((lean, lean.next, x))
                    lean.next += 1
                    lean.rows -= n
                    model.held_rows -= n
                    rows += n
                    taken += 1
                    taken_rows += n
                    metrics.queue_wait.observe(now - lean.enqueued)
                if lean.next < len(lean.xs):
                    rotated.append(lean)  # series left: to the back of the line
            held.extend(rotated)
        if not batch:
            return
        metrics.batch_size.observe(len(batch))
        metrics.batch_rows.observe(rows)
        by_len: dict[int, list[tuple[_Lean, int, Any]]] = {}
        for item in batch:
            by_len.setdefault(int(item[2].shape[0]), []).append(item)
        runtime = model.runtime
        for group in by_len.values():
            try:
                x = np.stack([item[2] for item in group])
                t0 = time.monotonic()
                y, _, q = runtime.run(x, runtime.zero_states(len(group)))
                metrics.model_run.observe(time.monotonic() - t0)
            except Exception as e:  # a failed run fails its requests, never the worker
                log.exception("model run failed for %s", runtime.path)
                for lean, _i, _x in group:
                    self._fail(lean, e)
                continue
            for k, (lean, i, _x) in enumerate(group):
                if lean.left < 0:
                    continue
                lean.outs[i] = Output(y[k], None if q is None else q[k])
                lean.left -= 1
                if lean.left == 0:
                    self._answer(lean)

    def _answer(self, lean: _Lean) -> None:
        lean.left = -1
        lean.model.held_requests -= 1
        if self.lean.pop(lean.ident, None) is not lean:  # cancelled meanwhile
            return
        try:
            answer = forecast_response_bytes(lean.model.runtime.manifest, cast(list[Output], lean.outs))
        except Exception as e:
            self._refuse(lean.ident, e)
            return
        self.channel.send(ANSWER, lean.ident, 0, payload=answer)

    def _fail(self, lean: _Lean, error: BaseException) -> None:
        if lean.left < 0:
            return
        self._drop(lean)
        if self.lean.pop(lean.ident, None) is lean:
            self._refuse(lean.ident, error)

    def _done(
        self, ident: int, model: _Model, futures: list[asyncio.Future[Output]], done: asyncio.Future[Any]
    ) -> None:
        if not done.cancelled():
            done.exception()  # read even when nobody is answered: asyncio would log it as never retrieved
        if self.inflight.pop(ident, None) is None:  # cancelled by the main process: nobody to answer
            return
        if done.cancelled():
            self._refuse(ident, Unavailable("the forecast was cancelled in the forecast worker; retry"))
            return
        error = done.exception()
        if error is not None:
            for f in futures:
                f.cancel()  # the rest of the request is not run
            self._refuse(ident, error)
            return
        try:
            outs = [f.result() for f in futures]
            answer = forecast_response(model.runtime.manifest, outs).SerializeToString()
        except Exception as e:
            self._refuse(ident, e)
            return
        self.channel.send(ANSWER, ident, 0, payload=answer)

    def _refuse(self, ident: int, error: BaseException) -> None:
        """What the main process's Front._status answers: ours with their code and words, anything else
        logged with a request id and answered INTERNAL without its text."""
        if isinstance(error, ServiceError):
            code, message = error.code.value[0], error.message
        else:
            request_id = uuid.uuid4().hex[:12]
            log.error("Forecast failed (request id %s)", request_id, exc_info=error)
            code, message = _INTERNAL, f"internal error (request id {request_id})"
        self.channel.send(ANSWER, ident, code, payload=message.encode())

    async def _send_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY_S)
            self._metrics_once()

    def _metrics_once(self) -> None:
        for key, model in self.models.items():
            payload = model.metrics.take()
            if payload is not None:
                self.channel.send(BATCHES, 0, key, payload=payload)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s", stream=sys.stderr
    )
    # SIGTTOU too: in a process group of its own, a worker is a background job of the terminal it logs to,
    # which stops it at its first line when the terminal is set to (`stty tostop`)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    # as service.server.settle_heap: start-up's objects out of the collector's sight, fewer young passes
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    with contextlib.closing(sock):
        return loops.run(Worker(sock).serve(), argv[1] if len(argv) > 1 else "auto")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
