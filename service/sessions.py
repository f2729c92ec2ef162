"""Streaming sessions: an id, a pool slot holding the recurrent state, and sequence bookkeeping.

Sequence numbers make retries safe: the last applied number, sent again with the same rows (a digest
is kept), is answered again from the stored forecast; the same number with other rows, or any number
but the next, is an error naming the number expected. Steps take
turns: a ticket is queued the moment a message arrives and the turn passes on only when the step has
finished, so at most one step is in flight and steps apply in arrival order. The batcher records an
applied step (`commit`) on the event loop even when the caller has gone away, so state and sequence
number never disagree. A session removed while a step of it is queued or running (an OpenSession
cancelled during its warm-up) keeps its pool slot until that step has finished: a slot goes back to the
pool only when nothing can write it any more.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .batcher import Output
from .errors import FailedPrecondition, NotFound, ResourceExhausted
from .metrics import Metrics
from .repository import ModelVersion

log = logging.getLogger(__name__)


def rows_digest(x: np.ndarray) -> bytes:
    """What identifies a step's rows for retries: 16 bytes of BLAKE2b over the rows as row-major float32
    (a session's column count is fixed by its model, so the bytes also fix the row count). Stored in
    snapshots: changing it makes every saved digest refuse its retry."""
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float32).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Session:
    id: str
    mv: ModelVersion  # the version it opened on: its runtime, batcher and state pool
    slot: int
    owner: str | None = None  # the identity that opened it (security, issue 8): only it reaches the session
    last_seq: int = 0
    steps: int = 0  # rows applied
    forecast: np.ndarray | None = None  # answer to last_seq
    last_digest: bytes = b""  # rows_digest of the rows of last_seq: a retry must send the same rows
    quantile_forecast: np.ndarray | None = None  # [horizon, targets, quantiles] for last_seq (quantile models)
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    _free_slot: Callable[[], None] | None = None  # closed while busy: frees the slot once the turn is let go
    _held: bool = False  # someone holds the turn: its step is being started or is in flight
    _turns: deque[asyncio.Future[None]] = field(default_factory=deque)  # callers waiting, in arrival order

    @property
    def model(self) -> str:
        return self.mv.name

    @property
    def version(self) -> int:
        return self.mv.version

    @property
    def busy(self) -> bool:
        return self._held or bool(self._turns)

    def queue_turn(self) -> asyncio.Future[None]:
        """A ticket for the next turn, taken synchronously so that arrival order is kept; it is already
        done when the session is free. Whoever holds a granted ticket must `release()` exactly once."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.busy:
            self._held = True
            ticket.set_result(None)
        else:
            self._turns.append(ticket)
        return ticket

    def release(self) -> None:
        """Hands the turn to the next live ticket, or frees the session."""
        while self._turns:
            ticket = self._turns.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self._held = False
        if self._free_slot is not None:  # closed while a step ran: nothing can write the slot any more
            free, self._free_slot = self._free_slot, None
            free()

    def drop(self, ticket: asyncio.Future[None]) -> None:
        """For a ticket whose holder will never use it (cancelled): pass the turn on if it was granted."""
        if ticket.done() and not ticket.cancelled():
            self.release()
        else:
            ticket.cancel()

    async def take(self) -> None:
        ticket = self.queue_turn()
        try:
            await ticket
        except asyncio.CancelledError:
            self.drop(ticket)
            raise

    def check_sequence(self, seq: int, digest: bytes | None = None) -> bool:
        """True when `seq` is a retry of the last applied step (with the same rows, when `digest` is given);
        raises unless it is the next one."""
        if seq == self.last_seq and seq > 0 and self.forecast is not None:
            if digest is not None and self.last_digest and digest != self.last_digest:
                raise FailedPrecondition(
                    f"session {self.id}: sequence {seq} was already applied with different rows; a retry must "
                    f"resend the same rows, new rows take sequence {self.last_seq + 1}"
                )
            return True
        if seq != self.last_seq + 1:
            raise FailedPrecondition(
                f"session {self.id}: sequence {seq} is out of order; expected {self.last_seq + 1}"
                + (f" (or {self.last_seq} to repeat the last step)" if self.last_seq else "")
            )
        return False

    def committer(self, seq: int, rows: int, digest: bytes = b"") -> Callable[[Output], None]:
        def commit(out: Output) -> None:
            self.last_seq = seq
            self.steps += rows
            self.forecast = out.y
            self.quantile_forecast = out.q
            self.last_digest = digest
            self.last_used = time.monotonic()

        return commit


class SessionTable:
    """All live sessions of the server, keyed by id; slots come from each model version's pool."""

    def __init__(self, metrics: Metrics, idle_s: float, max_per_owner: int | None = None) -> None:
        self._sessions: dict[str, Session] = {}
        self._metrics = metrics
        self.idle_s = idle_s
        # security (issue 8, docs/readme/security.md): live sessions per owner identity, so one client cannot
        # take every slot; kept by open/restore/_remove, checked in open. Keep it in any rework of the table.
        self.max_per_owner = max_per_owner
        self._owned: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, mv: ModelVersion, owner: str | None = None) -> Session:
        labels = (mv.name, str(mv.version))
        if owner is not None and self.max_per_owner is not None and self._owned[owner] >= self.max_per_owner:
            self._metrics.sessions_rejected.labels(*labels).inc()
            raise ResourceExhausted(
                f"{owner} holds {self._owned[owner]} live session(s), the most one client identity may hold "
                f"(max_sessions_per_identity / GATECAST_MAX_SESSIONS_PER_IDENTITY = {self.max_per_owner}); "
                "close one or let it expire"
            )
        try:
            slot = mv.pool.acquire()
        except ResourceExhausted:
            self._metrics.sessions_rejected.labels(*labels).inc()
            raise
        session = Session(id=secrets.token_hex(16), mv=mv, slot=slot, owner=owner)
        self._sessions[session.id] = session
        if owner is not None:
            self._owned[owner] += 1
        self._metrics.sessions_opened.labels(*labels).inc()
        self._metrics.live_sessions.labels(*labels).inc()
        return session

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """Another identity's session is answered like a missing one (NOT_FOUND): its existence does not leak."""
        session = self._sessions.get(session_id)
        if session is None or (session.owner is not None and session.owner != owner):
            raise NotFound(
                f"session {session_id!r} not found: it was closed, expired after {self.idle_s:.0f} s idle, "
                "or never existed; open a new one"
            )
        return session

    def _remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        session.closed = True
        if session.owner is not None:
            self._owned[session.owner] -= 1
            if not self._owned[session.owner]:
                del self._owned[session.owner]
        pool, slot = session.mv.pool, session.slot
        if session.busy:  # a step may still write the slot: free it when the session's turn is let go
            session._free_slot = lambda: pool.release(slot)
        else:
            pool.release(slot)
        self._metrics.live_sessions.labels(session.model, str(session.version)).dec()

    async def close(self, session_id: str, owner: str | None = None) -> Session:
        session = self.get(session_id, owner)
        await session.take()  # let an in-flight step finish before the slot is freed
        try:
            if session.closed:
                raise NotFound(f"session {session_id!r} not found: it was closed")
            self._remove(session)
        finally:
            session.release()
        self._metrics.sessions_closed.labels(session.model, str(session.version)).inc()
        return session

    def discard(self, session: Session) -> None:
        """Removes a session whose opening failed."""
        self._remove(session)

    def expire(self, now: float | None = None) -> int:
        """Removes sessions idle longer than idle_s that have no step in flight."""
        now = time.monotonic() if now is None else now
        expired = [s for s in self._sessions.values() if now - s.last_used > self.idle_s and not s.busy]
        for s in expired:
            self._remove(s)
            self._metrics.sessions_expired.labels(s.model, str(s.version)).inc()
        if expired:
            log.info("expired %d idle session(s)", len(expired))
        return len(expired)

    # --- for service.snapshot: the table as values, and a session re-created under its own id ----------

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def restore(self, mv: ModelVersion, session_id: str, states: list[np.ndarray], owner: str | None = None) -> Session:
        """Re-creates a saved session with its state tensors ([dims0, dims1] each, in manifest order); the
        caller sets its sequence bookkeeping. Raises ValueError if the id is live, ResourceExhausted if full."""
        if session_id in self._sessions:
            raise ValueError(f"session {session_id} is already live")
        slot = mv.pool.acquire()
        mv.pool.scatter(np.array([slot], dtype=np.int64), [a[:, None, :] for a in states])
        session = Session(id=session_id, mv=mv, slot=slot, owner=owner)  # snapshots do not keep owners yet
        self._sessions[session_id] = session
        if owner is not None:
            self._owned[owner] += 1
        self._metrics.live_sessions.labels(mv.name, str(mv.version)).inc()
        return session
