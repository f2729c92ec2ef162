"""The session store (issue 12): each session's blob (docs/snapshot.md) kept in Redis, so that when the
replica serving a session dies another one takes it over at the next sequence number with exact answers.

What is written: a session when it opens, after every step whose sequence number is a multiple of
`session_store_every` (N), and a tombstone when it closes. The answer to a written step leaves only once
Redis holds the session as of that step (or the write has failed: a Redis outage never fails a step; it is
logged and counted in gatecast_session_store_errors_total, and the session carries on here). A write refused
because another replica holds the session fails the step UNAVAILABLE instead: its answer never leaves. So with
N = 1 the store holds every answered step: a replica taking a session over answers the next sequence
number, and a resent last step with its stored answer. With N > 1 the store may lag by up to N - 1 steps:
the replica taking over answers FAILED_PRECONDITION naming the sequence it expects, and the client resends
from there (it must have kept those rows). Encoding and the Redis round trip run in a writer thread, a
whole pipeline of sessions at a time; the event loop only copies each session's state.

Redis holds one hash per session, `gatecast:session:<id>`: `blob`, `seq` (its last_seq) and `holder` (the
random id of the replica that wrote it), or `closed` (a tombstone, so that a late write cannot bring a
closed session back). Each key lives `session_store_ttl_s` after its last write. Fencing: a replica that
takes a session over makes itself the holder (a Lua script, atomically with reading the blob), and a
write lands only when its replica is the holder and its sequence number is above the stored one. A replica
that was only cut off, not dead, cannot write stale state over its successor's: its write is refused, and
it forgets its copy of the session (a later call there takes the session over again, from the store).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis

from .batcher import Output
from .errors import FailedPrecondition, NotFound, Unavailable
from .metrics import Metrics
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable
from .settings import Settings, SettingsError
from .snapshot import (
    SessionRecord,
    SnapshotError,
    _record,
    _state_names,
    decode_session,
    encode_session,
    restore_session,
)

log = logging.getLogger(__name__)

KEY = "gatecast:session:"
MAX_PIPELINE = 512  # sessions written in one Redis round trip
PAUSE_AFTER_ERROR_S = 0.5  # after a failed write, writes fail at once for this long instead of waiting on Redis
TIMEOUT_S = 1.0  # Redis connect and socket timeout
WRITTEN, STALE, FENCED, CLOSED = 1, 0, -1, -2  # what the write script answers
OUTCOMES = {WRITTEN: "written", STALE: "stale", FENCED: "fenced", CLOSED: "closed"}


def _taken_over(ids: list[str]) -> str:
    """What a step whose write was fenced (or met a tombstone) is answered, UNAVAILABLE."""
    which = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return (
        f"session {which} is held by another replica (taken over from the session store) or was closed there: "
        "this replica's step was not kept; retry (the next call takes the session over again, from the store)"
    )


# KEYS[1] the session; ARGV holder, seq, blob, ttl ms
_WRITE = """
local h = redis.call('HMGET', KEYS[1], 'holder', 'seq', 'closed')
if h[3] then return -2 end
if h[1] and h[1] ~= ARGV[1] then return -1 end
if h[2] and tonumber(h[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'seq', ARGV[2], 'blob', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
# KEYS[1]; ARGV holder, ttl ms: the blob, this replica made its holder; 'closed'; or nil
_TAKE = """
local h = redis.call('HMGET', KEYS[1], 'blob', 'closed')
if h[2] then return 'closed' end
if not h[1] then return false end
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return h[1]
"""
# KEYS[1]; ARGV ttl ms
_CLOSE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'closed', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class _Entry:
    """A session's latest unwritten record; `done` resolves to the write's outcome (None: it failed)."""

    record: SessionRecord  # encoded in the writer thread
    done: asyncio.Future[int | None]


class SessionStore:
    def __init__(self, settings: Settings, sessions: SessionTable, repo: Repository, metrics: Metrics) -> None:
        assert settings.session_store_url is not None
        self.url = settings.session_store_url
        self.every = settings.session_store_every
        self.ttl_ms = round(1000 * (settings.session_store_ttl_s or settings.session_idle_s))
        self.holder = secrets.token_hex(8)  # this process: a restarted replica is a new holder
        self.sessions = sessions
        self.repo = repo
        self.metrics = metrics
        try:
            self.client = redis.Redis.from_url(self.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        except ValueError as e:
            raise SettingsError(f"session_store_url (GATECAST_SESSION_STORE_URL) {self.url!r}: {e}") from e
        self._write = self.client.register_script(_WRITE)
        self._take = self.client.register_script(_TAKE)
        self._close = self.client.register_script(_CLOSE)
        self._cond = threading.Condition()
        self._pending: dict[str, _Entry] = {}  # session id -> its record waiting for the writer
        self._inflight: dict[str, _Entry] = {}  # being written
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0
        self._last_warning = 0.0
        self._recovering: dict[tuple[str, str | None], asyncio.Future[bool]] = {}
        sessions.store = self

    # --- life ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="session-store", daemon=True)
        self._thread.start()
        try:
            await asyncio.to_thread(self.client.ping)
            log.info("session store %s: every %d step(s), keys live %.0f s", self.url, self.every, self.ttl_ms / 1e3)
        except redis.RedisError as e:
            self._error("ping", e)

    async def close(self) -> None:
        """Writes what is pending, then stops the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        self.client.close()

    def _error(self, op: str, e: BaseException, n: int = 1) -> None:
        self.metrics.store_errors.labels(op).inc(n)
        now = time.monotonic()
        if now - self._last_warning > 5.0:  # an outage logs a line every few seconds, not one per step
            self._last_warning = now
            log.warning("session store %s: %s failed (%s); sessions carry on locally", self.url, op, e)

    # --- writes: queued on the loop, sent by the writer thread --------------------------------------

    def save(self, mv: ModelVersion, sessions: list[Session]) -> None:
        """On the loop, right after these sessions' steps were recorded: each session as a record (its state
        copied in one indexed read), queued for the writer. A queued record not yet sent is replaced."""
        if not sessions or self._closing:  # closing: the server has stopped, nothing waits for a write
            return
        assert self._loop is not None
        arrays = mv.pool.gather(np.array([s.slot for s in sessions], dtype=np.int64))
        names = _state_names(mv)
        now = time.monotonic()
        records = [
            _record(s, {n: a[:, k, :] for n, a in zip(names, arrays, strict=True)}, now) for k, s in enumerate(sessions)
        ]
        with self._cond:
            for r in records:
                entry = self._pending.get(r.id)
                if entry is None:
                    self._pending[r.id] = _Entry(r, self._loop.create_future())
                else:
                    entry.record = r
            self._cond.notify()

    def _waits(self, ids: list[str]) -> list[tuple[str, asyncio.Future[int | None]]]:
        """(id, its write's outcome) for each of these sessions with a write pending or in flight."""
        with self._cond:
            found = ((i, self._pending.get(i) or self._inflight.get(i)) for i in ids)
            return [(i, e.done) for i, e in found if e is not None]

    def after(self, step: asyncio.Future[Output], ids: list[str]) -> asyncio.Future[Output]:
        """A future that resolves as `step` does, once what the step recorded for these sessions is written
        (or its write has failed)."""
        assert self._loop is not None
        out: asyncio.Future[Output] = self._loop.create_future()

        def stepped(f: asyncio.Future[Output]) -> None:
            if f.cancelled():
                out.cancel()
            elif (e := f.exception()) is not None:
                out.set_exception(e)
            elif not (waits := self._waits(ids)):
                out.set_result(f.result())
            else:

                def written(_: object) -> None:
                    if out.done():
                        return
                    # refused because another replica holds the session (it took it over) or closed it: this
                    # copy was stale and is forgotten here (`_finish`), so its answer must not leave either
                    lost = [sid for sid, w in waits if w.result() in (FENCED, CLOSED)]
                    if lost:
                        out.set_exception(Unavailable(_taken_over(lost)))
                    else:
                        out.set_result(f.result())

                futures = [w for _, w in waits]
                (futures[0] if len(futures) == 1 else asyncio.gather(*futures)).add_done_callback(written)

        step.add_done_callback(stepped)
        return out

    async def opened(self, session: Session) -> bool:
        """Writes a new session; False when its id is already in the store (held, or closed, elsewhere)."""
        self.save(session.mv, [session])
        waits = self._waits([session.id])
        outcome = await waits[0][1] if waits else WRITTEN
        return outcome in (WRITTEN, None)  # a failed write does not refuse the session

    def _run(self) -> None:
        """The writer thread: takes what is pending (up to MAX_PIPELINE sessions), writes it, reports back."""
        assert self._loop is not None
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = {i: self._pending.pop(i) for i in list(itertools.islice(self._pending, MAX_PIPELINE))}
                self._inflight = batch
            outcomes = self._put(list(batch.values()))
            with self._cond:
                self._inflight = {}
            try:
                self._loop.call_soon_threadsafe(self._finish, list(batch.values()), outcomes)
            except RuntimeError:  # the loop has closed
                return

    def _put(self, entries: list[_Entry]) -> list[int | None]:
        if time.monotonic() < self._down_until:
            self.metrics.store_errors.labels("write").inc(len(entries))
            return [None] * len(entries)
        try:
            pipe = self.client.pipeline(transaction=False)
            for e in entries:
                r = e.record
                self._write(
                    keys=[KEY + r.id], args=[self.holder, r.last_seq, encode_session(r), self.ttl_ms], client=pipe
                )
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            self._down_until = time.monotonic() + PAUSE_AFTER_ERROR_S
            self._error("write", e, len(entries))
            return [None] * len(entries)
        outcomes: list[int | None] = []
        for r in results:
            if isinstance(r, Exception):
                self._error("write", r)
                outcomes.append(None)
            else:
                outcomes.append(int(r))
        return outcomes

    def _finish(self, entries: list[_Entry], outcomes: list[int | None]) -> None:
        """On the loop: a write refused because another replica holds the session (or it was closed there)
        means this copy is stale: it is forgotten here."""
        for e, outcome in zip(entries, outcomes, strict=True):
            if outcome is not None:
                self.metrics.store_writes.labels(OUTCOMES[outcome]).inc()
            if outcome in (FENCED, CLOSED):
                sid = e.record.id
                log.info("session %s is held by another replica (or closed there); forgotten here", sid)
                self.sessions.forget(sid)
            if not e.done.done():
                e.done.set_result(outcome)

    # --- closing and taking over --------------------------------------------------------------------

    async def closed(self, session_id: str) -> None:
        """A closed session's tombstone: a late write (from here or a cut-off replica) cannot revive it."""
        with self._cond:
            entry = self._pending.pop(session_id, None)
        if entry is not None and not entry.done.done():  # nobody may wait for a write that will not happen
            entry.done.set_result(CLOSED)
        try:
            await asyncio.to_thread(self._close, keys=[KEY + session_id], args=[self.ttl_ms])
        except redis.RedisError as e:
            self._error("close", e)

    def recover(self, session_id: str, owner: str | None) -> asyncio.Future[bool]:
        """Takes the session over from the store: True when it is live here now. One look per id and caller
        at a time: later calls for it wait for the same answer, in the order they came."""
        key = (session_id, owner)
        fut = self._recovering.get(key)
        if fut is None:
            fut = self._recovering[key] = asyncio.ensure_future(self._take_over(session_id, owner))
            fut.add_done_callback(lambda _: self._recovering.pop(key, None))
        return fut

    async def _take_over(self, session_id: str, owner: str | None) -> bool:
        key = KEY + session_id
        try:
            blob, closed = await asyncio.to_thread(self.client.hmget, key, ["blob", "closed"])
        except redis.RedisError as e:
            self._error("read", e)
            raise Unavailable(
                f"session {session_id} is not on this replica and the session store cannot be reached to look "
                f"for it ({e}); retry"
            ) from e
        if blob is None or closed is not None:
            return False
        r = self._decode(session_id, blob)
        if r.owner is not None and r.owner != owner:
            return False  # another identity's session: NOT_FOUND, as on the replica holding it
        try:
            mv = self.repo.resolve(r.model, r.version)
        except NotFound as e:
            raise FailedPrecondition(
                f"session {session_id} runs on model {r.model!r} version {r.version}, which this replica does not "
                f"serve ({e.message}); send it to a replica serving that version, or open a new session"
            ) from e
        if mv.runtime.manifest.onnx.sha256 != r.onnx_sha256:  # checked before taking it: the holder keeps it
            raise FailedPrecondition(
                f"session {session_id} was written by another graph of {r.model} v{r.version} (sha256 "
                f"{r.onnx_sha256[:12]}...); replicas must serve identical model files"
            )
        try:
            blob = await asyncio.to_thread(self._take, keys=[key], args=[self.holder, self.ttl_ms])
        except redis.RedisError as e:
            self._error("read", e)
            raise Unavailable(
                f"session {session_id}: the session store failed while taking it over ({e}); retry"
            ) from e
        if blob is None or blob == b"closed":
            return False
        if self.sessions.locate(session_id) >= 0:  # taken over meanwhile by another call
            return True
        try:
            restore_session(self.sessions, self.repo, self._decode(session_id, blob))
        except SnapshotError as e:
            raise FailedPrecondition(f"session {session_id} cannot be taken over from the store: {e}") from e
        self.metrics.sessions_resumed.labels(r.model, str(r.version)).inc()
        log.info("session %s taken over from the session store at sequence %d", session_id, r.last_seq)
        return True

    @staticmethod
    def _decode(session_id: str, blob: bytes | str) -> SessionRecord:
        try:
            r = decode_session(blob if isinstance(blob, bytes) else blob.encode())
        except SnapshotError as e:
            raise FailedPrecondition(f"session {session_id}: its blob in the session store is unreadable: {e}") from e
        if r.id != session_id:
            raise FailedPrecondition(f"session {session_id}: the session store holds session {r.id} under its key")
        return r
