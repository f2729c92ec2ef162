"""Dynamic batching, one batcher per model version.

Work items (a one-shot series from a zero state, or a session step from its pooled state) wait in a
queue. A batch closes when it is full or its oldest item has waited `max_queue_delay_ms`; it runs in a
worker thread while the next batch gathers. Items of different lengths share a batch by bucketing: one
onnxruntime run per distinct length, so no answer depends on what it was batched with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import DeadlineExceeded, ResourceExhausted, Unavailable
from .metrics import Metrics
from .pool import StatePool
from .runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkItem:
    x: np.ndarray  # [time, features] float32
    slot: int | None  # pool slot whose state is read and written; None: zero state, nothing kept
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # time.monotonic() after which the item is not run
    commit: Callable[[np.ndarray], None] | None = None  # runs on the event loop when a step has applied
    enqueued: float = field(default_factory=time.monotonic)


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
        self._queue: deque[WorkItem] = deque()
        self._wake = asyncio.Event()  # the queue got its first item
        self._full = asyncio.Event()  # the queue holds a full batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"run-{runtime.manifest.name}")
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[list[np.ndarray | BaseException]] | None = None
        self._closing = False
        labels = (runtime.manifest.name, str(runtime.manifest.version))
        self._m_wait = metrics.queue_wait.labels(*labels)
        self._m_run = metrics.model_run.labels(*labels)
        self._m_batch = metrics.batch_size.labels(*labels)
        self._m_rejected = metrics.queue_rejected.labels(*labels)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.runtime.path}")

    def submit(
        self,
        x: np.ndarray,
        slot: int | None = None,
        deadline: float | None = None,
        commit: Callable[[np.ndarray], None] | None = None,
    ) -> asyncio.Future[np.ndarray]:
        """Queues one item; its future resolves to y [horizon, targets]."""
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another instance")
        if len(self._queue) >= self.max_queue_size:
            self._m_rejected.inc()
            raise ResourceExhausted(
                f"batch queue full for {self.runtime.manifest.name} v{self.runtime.manifest.version} "
                f"({self.max_queue_size} items waiting); retry with backoff"
            )
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(WorkItem(x, slot, fut, deadline, commit))
        if len(self._queue) == 1:
            self._wake.set()
        elif len(self._queue) >= self.max_batch_size:
            self._full.set()
        return fut

    async def _collect(self) -> list[WorkItem]:
        """Waits for a first item, then until the batch is full or the first item has waited `delay`.
        Submitters wake the collector only on those two events, not once per item."""
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        remaining = self._queue[0].enqueued + self.delay - time.monotonic()
        if len(self._queue) < self.max_batch_size and remaining > 0:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), remaining)
        return self._take()

    def _take(self, batch: list[WorkItem] | None = None) -> list[WorkItem]:
        """Moves runnable items from the queue into the batch: not cancelled, not past their deadline,
        and at most one step per session slot (a later step of the same session waits its turn)."""
        batch = batch if batch is not None else []
        slots = {it.slot for it in batch if it.slot is not None}
        now = time.monotonic()
        deferred: list[WorkItem] = []
        while self._queue and len(batch) < self.max_batch_size:
            it = self._queue.popleft()
            if it.future.done():  # the caller went away
                continue
            if it.deadline is not None and now > it.deadline:
                it.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                continue
            if it.slot is not None:
                if it.slot in slots:
                    deferred.append(it)
                    continue
                slots.add(it.slot)
            batch.append(it)
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _loop(self) -> None:
        while True:
            try:
                await self._dispatch_next()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving: a bug in one dispatch must not stop the model
                log.exception("batcher dispatch failed for %s", self.runtime.path)

    async def _dispatch_next(self) -> None:
        batch = await self._collect()
        if self._inflight is not None:
            await asyncio.wait([self._inflight])
            batch = self._take(batch)  # top up with what arrived while the model was busy
        if not batch:
            return
        now = time.monotonic()
        for it in batch:
            self._m_wait.observe(now - it.enqueued)
        self._m_batch.observe(len(batch))
        self._inflight = asyncio.get_running_loop().run_in_executor(self._executor, self._execute, batch)
        self._inflight.add_done_callback(lambda f, b=batch: self._deliver(b, f))  # type: ignore[misc]

    def _execute(self, batch: list[WorkItem]) -> list[np.ndarray | BaseException]:
        """Worker thread: one run per distinct length; states gathered from and scattered to the pool."""
        results: list[np.ndarray | BaseException] = [RuntimeError("not run")] * len(batch)
        by_len: dict[int, list[int]] = {}
        for i, it in enumerate(batch):
            by_len.setdefault(it.x.shape[0], []).append(i)
        for idx in by_len.values():
            try:
                x = np.stack([batch[i].x for i in idx]) if len(idx) > 1 else batch[idx[0]].x[None]
                states = self.runtime.zero_states(len(idx))
                cols = np.array([k for k, i in enumerate(idx) if batch[i].slot is not None], dtype=np.int64)
                slots = np.array([batch[idx[k]].slot for k in cols], dtype=np.int64)
                if slots.size:
                    for s, g in zip(states, self.pool.gather(slots), strict=True):
                        s[:, cols, :] = g
                t0 = time.monotonic()
                y, new_states = self.runtime.run(x, states)
                self._m_run.observe(time.monotonic() - t0)
                if slots.size:
                    self.pool.scatter(slots, [s[:, cols, :] for s in new_states])
                for k, i in enumerate(idx):
                    results[i] = y[k]
            except Exception as e:  # a failed run fails its items, never the batcher
                log.exception("model run failed for %s", self.runtime.path)
                for i in idx:
                    results[i] = e
        return results

    def _deliver(self, batch: list[WorkItem], done: asyncio.Future[list[np.ndarray | BaseException]]) -> None:
        exc = done.exception() if not done.cancelled() else RuntimeError("cancelled")
        results: list[np.ndarray | BaseException] = [exc] * len(batch) if exc else done.result()
        for it, r in zip(batch, results, strict=True):
            if isinstance(r, BaseException):
                if not it.future.done():
                    it.future.set_exception(r)
                continue
            if it.commit is not None:
                it.commit(r)  # the state has advanced: record it even if the caller has gone
            if not it.future.done():
                it.future.set_result(r)

    async def close(self) -> None:
        """Stops taking work, lets queued and running items finish, then stops the worker."""
        self._closing = True
        while self._queue or (self._inflight is not None and not self._inflight.done()):
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
