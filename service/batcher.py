"""Dynamic batching, one batcher per model version.

Work arrives as requests (a `Flow`): a one-shot Forecast is one flow of many series, each from a zero
state; a session step is a flow of one item that starts from its pooled state. What one request may
hold is bounded three ways:

- *chunks*: a series or observation longer than `chunk_rows` runs in pieces of at most that many rows,
  its recurrent state carried privately from piece to piece (a window run whole and the same rows fed
  piece by piece give the same forecast to float32 rounding), so no run is longer than a chunk;
- *batches*: one model run holds at most `max_batch_rows` rows (time steps summed over the batch) and
  `max_batch_size` items; flows are served round robin, and while others wait a flow gets at most half
  of a batch, so a big request interleaves with everyone else's instead of holding the worker;
- *the queue*: it counts rows, not items (`max_queue_rows`) and requests (`max_queue_size`); one request
  may hold at most `max_request_rows` rows and never more than half of the queue.

A batch closes when it is full or its oldest item has waited `max_queue_delay_ms` (default 0: a batch is
taken as soon as the worker is free, so under load it is what arrived during the previous run, and an
idle server runs a lone request at once); it runs in a worker thread while the next one gathers. When
runs are short (every queued piece one row, the last run at most PREFETCH_MAX_RUN_S) and a full batch is
waiting, that batch is handed over at once to run right after the one running, so the worker does not wait
on the event loop between them. Items of different chunk lengths share a batch by bucketing: one
onnxruntime run per distinct length, so no answer depends on what it was batched with.

A session item reads its pool slot at its first chunk and writes it only after its last chunk succeeded:
a failed step leaves the session's state as it was. Every item that leaves the queue has its future
resolved, whatever fails (the run, the worker, a commit): no session stays busy forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from .metrics import Metrics, observe_many
from .pool import StatePool
from .runtime import ModelRuntime

log = logging.getLogger(__name__)

PAST_DEADLINE = "the deadline passed while the request was queued"  # what a request dropped unrun is told
# a full batch (of one-row pieces only) is handed to the worker while it runs another only when the last run
# took at most this long: a request arriving meanwhile may wait one run more, up to about this, and never one
# of a long window's pieces. 512 one-row steps of an LSTM 2x64 take 1.3-1.7 ms alone but 3-10 ms with the event
# loop and a client on the same two cores: a 5 ms bound turned the hand-over off in about half of those runs
# (StreamBatch 32 streams, depth 2, six runs each, alternating: 63,467-81,429 steps/s at 5 ms against
# 80,661-92,384 at 25-50 ms). Once a run has taken longer (a heavy model), the next batch waits for the worker
PREFETCH_MAX_RUN_S = 0.05

# limits used when the runtime carries no settings (test doubles); the server passes its Settings
DEFAULT_LIMITS = {
    "max_batch_rows": 2048,
    "chunk_rows": 512,
    "max_queue_rows": 4_000_000,
    "max_request_rows": 1_000_000,
}


class Output(NamedTuple):
    """One item's answer: y [horizon, targets] and, for a quantile model, q [horizon, targets, quantiles].
    `before`: for a session step, where its slot's (a block's: its slots') state before the step is: the
    run's input states and the item's first row and row count, or for a step run in pieces the state its
    first piece found, kept (read only by `restore`, when a recording fails, so that the step is not applied
    without being recorded; no slicing on the hot path)."""

    y: np.ndarray
    q: np.ndarray | None = None
    before: tuple[list[np.ndarray], int, int] | None = None


Results = list[Output | BaseException | None]  # a batch's, item by item (None: the item has rows left)


def _resolve(done: asyncio.Future[Results], result: Results | BaseException) -> None:
    if done.done():
        return
    if isinstance(result, BaseException):
        done.set_exception(result)
    else:
        done.set_result(result)


@dataclass(eq=False)
class Flow:
    """One request's pending items, served in order; the flow takes turns with other requests."""

    items: deque[WorkItem] = field(default_factory=deque)
    queued: bool = False  # in the batcher's round robin
    running: int = 0  # items of it in the batch being run


@dataclass(eq=False)
class WorkItem:
    x: np.ndarray  # [time, features] float32; a block: [sessions, time, features]
    slot: int | np.ndarray | None  # pool slot whose state is read and written; None: zero state, nothing kept
    future: asyncio.Future[Output]
    deadline: float | None  # time.monotonic() after which the item is not run
    commit: Callable[[Output], None] | None = None  # runs on the event loop when a step has applied
    enqueued: float = field(default_factory=time.monotonic)
    flow: Flow | None = None
    pos: int = 0  # rows already run
    chunk: int = 0  # rows of the piece being run
    state: list[np.ndarray] | None = None  # carried between pieces, [dim0, 1, dim1] each
    first: list[np.ndarray] | None = None  # a session's state before its first piece, kept for `restore`
    n: int = 1  # sessions: a block (`submit_block`) is n session steps of one piece each, slot [n]

    @property
    def block(self) -> bool:
        return self.x.ndim == 3

    @property
    def remaining(self) -> int:
        """Time steps left (per session, for a block)."""
        return int(self.x.shape[-2]) - self.pos


class Batcher:
    def __init__(
        self,
        runtime: ModelRuntime,
        pool: StatePool,
        metrics: Metrics,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        settings = getattr(runtime, "settings", None)
        limits = {k: int(getattr(settings, k, v)) for k, v in DEFAULT_LIMITS.items()}
        self.max_batch_rows = limits["max_batch_rows"]
        self.chunk_rows = max(1, min(limits["chunk_rows"], self.max_batch_rows))
        self.max_queue_rows = limits["max_queue_rows"]
        # a single request never takes more than half of the queue
        self.max_request_rows = max(1, min(limits["max_request_rows"], self.max_queue_rows // 2))
        self._flows: deque[Flow] = deque()
        self._n_flows = 0  # requests with unfinished items (queued or running)
        self._rows = 0  # rows admitted and not yet run: what the queue bound counts
        self._carried = 0  # items between two of their chunks: runnable at once, no gathering delay
        self._ready_rows = 0  # rows of the next pieces of queued items, to tell when a batch is full
        self._ready_items = 0
        self._wake = asyncio.Event()  # the queue got its first item
        self._full = asyncio.Event()  # the queue holds a full batch
        # the worker: one thread that runs batches handed over a queue and resolves each batch's future on
        # the event loop (what run_in_executor does, without its two futures and their chaining per run)
        self._jobs: queue.SimpleQueue[tuple[list[WorkItem], asyncio.Future[Results]] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Results] | None = None  # the batch handed to the worker last
        self._handed: deque[tuple[asyncio.Future[Results], list[WorkItem]]] = deque()  # handed over, oldest first
        self._last_run_s = 0.0  # how long the worker took over the last batch (written by the worker)
        self._closing = False
        labels = (runtime.manifest.name, str(runtime.manifest.version))
        self._m_wait = metrics.queue_wait.labels(*labels)
        self._m_run = metrics.model_run.labels(*labels)
        self._m_batch = metrics.batch_size.labels(*labels)
        self._m_rejected = metrics.queue_rejected.labels(*labels)
        self._m_rows = metrics.batch_rows.labels(*labels)
        self._m_queued_rows = metrics.queued_rows.labels(*labels)

    @property
    def queued_rows(self) -> int:
        return self._rows

    def start(self) -> None:
        self._loop_ref = loop = asyncio.get_running_loop()
        self._worker = threading.Thread(target=self._work, name=f"run-{self.runtime.manifest.name}", daemon=True)
        self._worker.start()
        self._task = loop.create_task(self._loop(), name=f"batcher-{self.runtime.path}")

    def _work(self) -> None:
        """The worker thread: runs each batch handed to it; its result goes back to the event loop."""
        assert self._loop_ref is not None
        while (job := self._jobs.get()) is not None:
            batch, done = job
            start = time.monotonic()
            try:
                result: Results | BaseException = self._execute(batch)
            except BaseException as e:  # _execute answers its own failures; this is the last resort
                result = e
            self._last_run_s = time.monotonic() - start
            try:
                self._loop_ref.call_soon_threadsafe(_resolve, done, result)
            except RuntimeError:  # the loop has closed: nobody is waiting
                return

    def submit(
        self,
        x: np.ndarray,
        slot: int | None = None,
        deadline: float | None = None,
        commit: Callable[[Output], None] | None = None,
    ) -> asyncio.Future[Output]:
        """Queues one item as its own request; its future resolves to an Output."""
        return self.submit_many([x], slot, deadline, commit)[0]

    def submit_many(
        self,
        xs: Sequence[np.ndarray],
        slot: int | None = None,
        deadline: float | None = None,
        commit: Callable[[Output], None] | None = None,
    ) -> list[asyncio.Future[Output]]:
        """Queues the series of one request (served in turn with other requests); one future per series.
        `slot` and `commit` are for a single session step."""
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another instance")
        if not xs:
            return []
        rows = sum(int(x.shape[0]) for x in xs)
        self.check_request_rows(rows)
        self.admit(rows)
        loop = asyncio.get_running_loop()
        flow = Flow()
        futures: list[asyncio.Future[Output]] = []
        now = time.monotonic()
        for x in xs:
            fut: asyncio.Future[Output] = loop.create_future()
            flow.items.append(WorkItem(x, slot, fut, deadline, commit, now, flow))
            futures.append(fut)
        self._enqueue(flow, rows, sum(min(self.chunk_rows, int(x.shape[0])) for x in xs), len(xs))
        return futures

    async def forecast(self, xs: Sequence[np.ndarray], deadline: float | None) -> list[Output]:
        """One-shot forecasts of a request's series from a zero state, in order. If the caller stops
        waiting (cancelled, or one series failed), what has not run yet is dropped."""
        futures = self.submit_many(xs, None, deadline)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def admit(self, rows: int, held_rows: int = 0, held_requests: int = 0) -> None:
        """Refuses a request the queue has no room for (rows or requests). `held_*`: what a caller holds
        beside this queue under the same bounds (a forecast worker's own line)."""
        queued_rows, queued = self._rows + held_rows, self._n_flows + held_requests
        if queued_rows + rows > self.max_queue_rows or queued >= self.max_queue_size:
            self._m_rejected.inc()
            raise ResourceExhausted(
                f"batch queue full for {self.runtime.manifest.name} v{self.runtime.manifest.version} "
                f"({queued_rows} rows of {queued} request(s) waiting; "
                f"bounds {self.max_queue_rows} rows, {self.max_queue_size} requests); retry with backoff"
            )

    def _enqueue(self, flow: Flow, rows: int, ready_rows: int, ready_items: int) -> None:
        """Puts an admitted request's flow at the back of the round robin and wakes the worker."""
        self._rows += rows
        self._ready_rows += ready_rows
        self._ready_items += ready_items
        self._n_flows += 1
        self._m_queued_rows.set(self._rows)
        first = not self._flows
        flow.queued = True
        self._flows.append(flow)
        if first:
            self._wake.set()
        if self._is_full():
            self._full.set()

    def submit_block(
        self, x: np.ndarray, slots: np.ndarray, deadline: float | None, commit: Callable[[Output], None]
    ) -> asyncio.Future[Output]:
        """Queues steps of many sessions as one request that runs whole in one model run: x [n, time,
        features] with time <= chunk_rows, slots [n] distinct, n <= max_batch_size. Its future resolves to
        Output(y [n, horizon, targets], q); `commit` records all n steps at once. For the servicer's batch
        RPCs: no per-step bookkeeping here."""
        n, steps = int(x.shape[0]), int(x.shape[1])
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another instance")
        assert 0 < n <= self.max_batch_size and 0 < steps <= self.chunk_rows and len(slots) == n
        rows = n * steps
        self.admit(rows)
        fut: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        flow = Flow()
        flow.items.append(WorkItem(x, slots, fut, deadline, commit, time.monotonic(), flow, n=n))
        self._enqueue(flow, rows, rows, n)
        return fut

    def after_run(self, callback: Callable[[], None]) -> bool:
        """Calls `callback` on the event loop once the batch handed to the worker last (running, or waiting
        to run after the one running) has been delivered, before a batch is taken after that delivery, so
        that what it submits rides in the next batch taken (with short runs and a full queue one more may
        have been handed over meanwhile: then the one after); False (and no call) when no batch is in the
        worker's hands. For callers that gather work while the worker is busy and hand it over as one item."""
        inflight = self._inflight
        if inflight is None or inflight.done():
            return False
        inflight.add_done_callback(lambda _: callback())
        return True

    def check_request_rows(self, rows: int) -> None:
        """Refuses a request bigger than one request may ever be."""
        if rows > self.max_request_rows:
            raise InvalidArgument(
                f"{rows} rows in one request (summed over its series); at most {self.max_request_rows} are "
                "accepted (GATECAST_MAX_REQUEST_ROWS, at most half of GATECAST_MAX_QUEUE_ROWS): split the request"
            )

    def _short_runs(self) -> bool:
        """Whether a batch may be handed over while another runs: every queued piece is one row (session
        steps, one-row series: never a long window's pieces) and the last run took at most
        PREFETCH_MAX_RUN_S."""
        return self._ready_rows <= self._ready_items and self._last_run_s <= PREFETCH_MAX_RUN_S

    def _is_full(self) -> bool:
        return self._ready_rows >= self.max_batch_rows or self._ready_items >= self.max_batch_size

    def _finish(self, it: WorkItem) -> None:
        """Bookkeeping for an item leaving for good (answered, failed or abandoned)."""
        self._rows -= it.remaining * it.n
        it.pos = int(it.x.shape[-2])
        it.state = it.first = None
        flow, it.flow = it.flow, None
        if flow is not None and not flow.items and not flow.running:
            self._n_flows -= 1

    async def _collect(self) -> None:
        """Waits for a first item, then until the batch is full or the first item has waited `delay`.
        Submitters wake the collector only on those two events, not once per item."""
        while not self._flows:
            self._wake.clear()
            await self._wake.wait()
        head = self._flows[0].items[0].enqueued if self._flows[0].items else time.monotonic()
        closes = head + self.delay
        while self._carried == 0 and not self._is_full() and (remaining := closes - time.monotonic()) > 0:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                # in whole milliseconds, rounded up, and the clock read again after: uvloop's timers count
                # milliseconds (one under half a millisecond runs at once) and may run up to one early
                await asyncio.wait_for(self._full.wait(), math.ceil(remaining * 1000) / 1000)

    @property
    def fair_share(self) -> tuple[int, int]:
        """Rows and items one request may take of a batch in its first pass, while others wait: half of each
        (at least a chunk and an item). The forecast worker's lean line shares its batches the same way."""
        return max(self.chunk_rows, self.max_batch_rows // 2), max(1, self.max_batch_size // 2)

    def _take(self, batch: list[WorkItem]) -> None:
        """Moves runnable pieces from the queue into the batch, round robin over requests: not cancelled,
        not past their deadline, at most one step per session slot, at most `max_batch_rows` rows and
        `max_batch_size` items; in a first pass each request gets at most half of the batch."""
        rows = items = 0  # `batch` is the caller's, so that whatever this moved out of the queue is answered
        # a session's single step never runs beside another of its steps: not in this batch, nor in one
        # handed to the worker and not yet delivered
        slots: set[int] = {
            it.slot  # type: ignore[misc]
            for f, b in self._handed
            if not f.done()
            for it in b
            if it.slot is not None and not isinstance(it.slot, np.ndarray)
        }
        now = time.monotonic()
        quota_rows, quota_items = self.fair_share
        for quota in (True, False):
            rotated: list[Flow] = []
            for _ in range(len(self._flows)):
                if rows >= self.max_batch_rows or items >= self.max_batch_size:
                    break
                flow = self._flows.popleft()
                f_rows = f_items = 0
                while flow.items and rows < self.max_batch_rows and items < self.max_batch_size:
                    it = flow.items[0]
                    chunk = min(self.chunk_rows, it.remaining)
                    cost = chunk * it.n  # rows this piece adds to the run
                    if it.future.done() and it.slot is None:  # the caller went away
                        flow.items.popleft()
                        self._unready(it, chunk)
                        self._finish(it)
                        continue
                    if it.deadline is not None and now > it.deadline:
                        flow.items.popleft()
                        self._unready(it, chunk)
                        self._finish(it)
                        if not it.future.done():
                            it.future.set_exception(DeadlineExceeded(PAST_DEADLINE))
                        continue
                    if quota and f_items and (f_rows + cost > quota_rows or f_items >= quota_items):
                        break
                    if batch and (rows + cost > self.max_batch_rows or items + it.n > self.max_batch_size):
                        break
                    # a block's sessions were claimed (their turns held) together: none is in another item
                    if not it.block:
                        if it.slot in slots:
                            break
                        if it.slot is not None:
                            slots.add(it.slot)  # type: ignore[arg-type]
                    flow.items.popleft()
                    self._unready(it, chunk)
                    it.chunk = chunk
                    flow.running += 1
                    batch.append(it)
                    rows += cost
                    items += it.n
                    f_rows += cost
                    f_items += it.n
                if flow.items:
                    rotated.append(flow)  # partly served: to the back of the line
                else:
                    flow.queued = False
            self._flows.extend(rotated)
        self._m_queued_rows.set(self._rows)  # once per batch, not per item leaving (`_finish`)

    def _unready(self, it: WorkItem, chunk: int) -> None:
        self._ready_rows -= chunk * it.n
        self._ready_items -= it.n
        if it.pos > 0:
            self._carried -= 1

    def _requeue(self, it: WorkItem) -> None:
        """An item with rows left goes back to its request's line, the request to the back of the queue."""
        flow = it.flow
        assert flow is not None
        flow.items.append(it)
        self._ready_rows += min(self.chunk_rows, it.remaining)
        self._ready_items += 1
        self._carried += 1
        if not flow.queued:
            flow.queued = True
            self._flows.append(flow)
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self._dispatch_next()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving: a bug in one dispatch must not stop the model
                log.exception("batcher dispatch failed for %s", self.runtime.path)

    async def _dispatch_next(self) -> None:
        await self._collect()
        while True:
            while self._handed and self._handed[0][0].done():
                self._handed.popleft()
            # a batch is taken once the worker is free: what arrives meanwhile (a small request behind a
            # big one's next pieces) rides in the very next run, not one run later. Only when runs are short
            # (`_short_runs`) is a full batch taken while one runs, to run right after it (no more than one
            # waits): the worker then does not sit idle while the loop delivers the last run and gathers the
            # next, and what arrives meanwhile waits at most one short run more
            if not self._handed or (len(self._handed) == 1 and self._is_full() and self._short_runs()):
                break
            await asyncio.wait([self._handed[0][0]])
            # one more turn of the loop: what the delivery set off (a stream's next message, pipelined
            # behind the one just answered, begins in a callback of that answer) is queued before the
            # batch is taken, so it rides in the very next run instead of the one after
            await asyncio.sleep(0)
        batch: list[WorkItem] = []
        try:
            self._take(batch)
            if not batch:
                if self._handed:  # all that waits is for sessions whose step is in the worker's hands
                    await asyncio.wait([self._handed[0][0]])
                return
            now = time.monotonic()
            observe_many(self._m_wait, [now - it.enqueued for it in batch if it.pos == 0])
            self._m_batch.observe(sum(it.n for it in batch))
            self._m_rows.observe(sum(it.chunk * it.n for it in batch))
            inflight: asyncio.Future[Results] = asyncio.get_running_loop().create_future()
            self._jobs.put((batch, inflight))
        except BaseException as e:  # the items left the queue: they must still be answered
            self._fail(batch, e if isinstance(e, Exception) else Unavailable("the batcher stopped"))
            raise
        self._inflight = inflight
        self._handed.append((inflight, batch))
        inflight.add_done_callback(lambda f, b=batch: self._deliver(b, f))  # type: ignore[misc]

    def _fail(self, batch: list[WorkItem], error: BaseException) -> None:
        for it in batch:
            self._settle(it, error)
        self._m_queued_rows.set(self._rows)

    def _settle(self, it: WorkItem, result: Output | BaseException) -> None:
        """Resolves an item of a batch for good; never raises."""
        try:
            if it.flow is not None:
                it.flow.running -= 1
            self._finish(it)
            if isinstance(result, BaseException):
                if not it.future.done():
                    it.future.set_exception(result)
                return
            if it.commit is not None:
                try:
                    it.commit(result)  # the state has advanced: record it even if the caller has gone
                except Exception as e:
                    log.exception("commit failed for %s", self.runtime.path)
                    if it.slot is not None:
                        self.restore(it.slot, result)  # not recorded: not applied either
                    if not it.future.done():
                        it.future.set_exception(e)
                    return
            if not it.future.done():
                it.future.set_result(result)
        except Exception as e:  # last resort: the future must not stay pending
            log.exception("delivering a result failed for %s", self.runtime.path)
            if not it.future.done():
                it.future.set_exception(e)

    def restore(self, slot: int | np.ndarray, out: Output) -> None:
        """Puts back the state a step found (`Output.before`), for a step whose recording failed: its turn
        is still held, so nothing has run on the slot since. Never raises (logs)."""
        if out.before is None:
            log.error("a step of %s was applied but not recorded (no state kept to put back)", self.runtime.path)
            return
        try:
            states, first, n = out.before
            self.pool.scatter(np.atleast_1d(np.asarray(slot, np.int64)), [s[:, first : first + n, :] for s in states])
        except Exception:
            log.exception("putting back the state of a step whose recording failed, for %s", self.runtime.path)

    def _execute(self, batch: list[WorkItem]) -> list[Output | BaseException | None]:
        """Worker thread: one run per distinct piece length. An item's first piece starts from its pool
        slot (or zero); later pieces from the state the previous piece left; its slot is written after
        its last piece. None in the result: the item has rows left."""
        results: list[Output | BaseException | None] = [RuntimeError("not run")] * len(batch)
        by_len: dict[int, list[int]] = {}
        for i, it in enumerate(batch):
            by_len.setdefault(it.chunk, []).append(i)
        for length, idx in by_len.items():
            try:
                items = [batch[i] for i in idx]
                at = np.cumsum([0] + [it.n for it in items]).tolist()  # an item's first row in the run
                x = np.concatenate(
                    [
                        it.x[:, it.pos : it.pos + length] if it.block else it.x[None, it.pos : it.pos + length]
                        for it in items
                    ]
                )
                fresh = [k for k, it in enumerate(items) if it.pos == 0 and it.slot is not None]
                if len(fresh) == len(items):  # every row starts from its pool slot (session steps): read as is
                    states = self.pool.gather(self._slots(items, fresh))
                else:
                    states = self.runtime.zero_states(at[-1])
                    if fresh:
                        cols, slots = self._rows_and_slots(items, fresh, at)
                        for s, g in zip(states, self.pool.gather(slots), strict=True):
                            s[:, cols, :] = g
                    for k, it in enumerate(items):
                        if it.state is not None:
                            for s, g in zip(states, it.state, strict=True):
                                s[:, at[k] : at[k] + 1, :] = g
                t0 = time.monotonic()
                y, new_states, q = self.runtime.run(x, states)
                self._m_run.observe(time.monotonic() - t0)
                last = [k for k, it in enumerate(items) if it.pos + length >= it.x.shape[-2]]
                done_slots = [k for k in last if items[k].slot is not None]
                if len(done_slots) == len(items):  # every row of the run goes back to its slot, in order
                    self.pool.scatter(self._slots(items, done_slots), new_states)
                elif done_slots:
                    cols, slots = self._rows_and_slots(items, done_slots, at)
                    self.pool.scatter(slots, [s[:, cols, :] for s in new_states])
                ended = set(last)
                for k, (i, it) in enumerate(zip(idx, items, strict=True)):
                    whole = it.pos == 0  # the item ran in this one piece: `states` holds its state before it
                    it.pos += length
                    r = at[k]
                    if k in ended:
                        it.state = None
                        n = it.n if it.block else 1
                        before = (states, r, n) if whole and it.slot is not None else None
                        if it.first is not None:  # ran in pieces: the state its first piece found
                            before, it.first = (it.first, 0, 1), None
                        if it.block:
                            results[i] = Output(y[r : r + n], None if q is None else q[r : r + n], before)
                        else:
                            results[i] = Output(y[r], None if q is None else q[r], before)
                    else:
                        if whole and it.slot is not None:  # a session step going on in pieces
                            it.first = [np.array(s[:, r : r + 1, :]) for s in states]
                        it.state = [np.array(s[:, r : r + 1, :]) for s in new_states]
                        results[i] = None
            except Exception as e:  # a failed run fails its items, never the batcher
                log.exception("model run failed for %s", self.runtime.path)
                for i in idx:
                    results[i] = e
        return results

    @staticmethod
    def _slots(items: list[WorkItem], ks: list[int]) -> np.ndarray:
        """The pool slots of items `ks`, in order (a block has n)."""
        slots = [items[k].slot for k in ks]
        if all(not isinstance(s, np.ndarray) for s in slots):
            return np.array(slots, np.int64)
        parts = [np.atleast_1d(np.asarray(s, dtype=np.int64)) for s in slots]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @staticmethod
    def _rows_and_slots(items: list[WorkItem], ks: list[int], at: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The run's rows of items `ks` and their pool slots (a block has n of each)."""
        # single session steps (an int slot each), the common case: no array per item
        if all(not isinstance(items[k].slot, np.ndarray) for k in ks):
            return np.array([at[k] for k in ks]), np.array([items[k].slot for k in ks], np.int64)
        rows = [np.arange(at[k], at[k] + items[k].n) for k in ks]
        return np.concatenate(rows), Batcher._slots(items, ks)

    def _deliver(self, batch: list[WorkItem], done: asyncio.Future[list[Output | BaseException | None]]) -> None:
        try:
            exc = done.exception() if not done.cancelled() else Unavailable("the model run was cancelled")
            results: list[Output | BaseException | None] = [exc] * len(batch) if exc else done.result()
        except Exception as e:
            results = [e] * len(batch)
        for it, r in zip(batch, results, strict=True):
            if not isinstance(r, BaseException):
                self._rows -= it.chunk * it.n  # the worker has advanced `pos` past the piece that ran
            if r is not None:
                self._settle(it, r)
                continue
            try:  # rows left: back in line, unless a one-shot caller has gone
                if it.slot is None and it.future.done():
                    self._settle(it, Unavailable("abandoned"))
                    continue
                assert it.flow is not None
                it.flow.running -= 1
                it.chunk = 0
                self._requeue(it)
            except Exception as e:
                log.exception("requeueing an item failed for %s", self.runtime.path)
                if it.flow is not None:
                    it.flow.running += 1  # _settle takes it off again
                self._settle(it, e)
        self._m_queued_rows.set(self._rows)

    async def close(self) -> None:
        """Stops taking work, lets queued and running items finish, then stops the worker."""
        self._closing = True
        while self._flows or any(not f.done() for f, _ in self._handed):
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._worker is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._worker.join)
