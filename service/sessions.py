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

Compact: a session is no Python object while it sits idle. Its bookkeeping lives in columns of its model
version's pool (`COLUMNS`: id, sequence, digest, stored answer, owner, ...), and the table finds it by id
through one open-addressing hash index (a numpy array of slot codes, linear probing keyed by the id's
random low 64 bits). 39 bytes per session beside its state (`COLUMNS`), plus the stored answer (4 bytes
per forecast value) and about 4 to 8 bytes of index; all of it is given back when sessions close (the
pool shrinks, the index shrinks, the C heap is trimmed). `Session` is a small handle made on demand; only
a session with steps waiting for their turn has a queue of tickets.

Narrow columns, and what their limits do: `last_seq` is 4 bytes; from sequence 2**32 - 1 on a session's
steps take the single-step path and a sequence above that is kept exactly in a dict beside (`big_seqs`);
`steps` (rows applied, informational) saturates at 2**32 - 1; `owner` numbers the identities holding live
sessions, at most 65,535 at a time (one more is refused with RESOURCE_EXHAUSTED); `last_used` is float32
seconds since the table was made (1 s resolution after 194 days up, plenty for idle expiry); the index
holds uint32 entries (version number and slot packed) while they fit, int64 otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gatecast import SESSION_HEADER

from .batcher import Output
from .errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from .metrics import Metrics
from .pool import USED, trim_heap
from .repository import ModelVersion
from .wire import session_key

if TYPE_CHECKING:
    from .store import SessionStore

log = logging.getLogger(__name__)

# bits of a slot's `flags` byte: USED (the pool's: acquired), then the table's
CLOSING = 2  # removed while a step held its turn: the slot is freed when the turn is let go
HELD = 4  # someone holds the turn: a step is being started or is in flight
ANSWERED = 8  # an answer to last_seq is stored
LIVE_MASK = USED | CLOSING  # a session is live when (flags & LIVE_MASK) == USED
# the per-session columns kept in each pool: name -> (dtype, shape per session); 39 bytes
COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "id": ("<u8", (2,)),  # the 16 id bytes as two little-endian words; both are hashed, keyed (`_home`)
    "flags": ("u1", ()),  # USED, CLOSING, HELD, ANSWERED (the pool makes this column)
    "last_seq": ("u4", ()),  # SEQ_BIG: at least that; the table's big_seqs holds any larger one exactly
    "steps": ("u4", ()),  # rows applied, saturating at STEPS_MAX
    "digest": ("<u8", ()),  # rows_digest of last_seq's rows as a little-endian word (0: none kept)
    "last_used": ("f4", ()),  # seconds since the table's `epoch` (time.monotonic)
    "owner": ("u2", ()),  # security (issue 8): the identity that opened it, as a number (0: none)
}
SLOT_MASK = 0xFFFFFFFF  # a code is (model version number << 32) | slot
STEPS_MAX = 0xFFFFFFFF
# the columns recording a step writes (the answer, its flag in `flags`, the sequence and its rows' digest, the
# step count, the time): copied before, written back if the recording raises partway
RECORD_COLUMNS = ("flags", "forecast", "quantile_forecast", "last_seq", "digest", "steps", "last_used")
SEQ_BIG = 0xFFFFFFFF  # a last_seq column at this value reads big_seqs[code] (absent: this value itself)
MAX_OWNERS = 0xFFFF  # identities holding live sessions at one time (the `owner` column's numbers)
DIGEST_BYTES = 8
MIN_INDEX = 1024
KNOWN_IDS = 4096  # ids one stream remembers the slots of (claim_step); beyond, the others are looked up
# where a stream found an id: version, slot, the id's bytes, the version's feature count, the id as the `id`
# column's two words
Known = tuple[ModelVersion, int, bytes, int, int, int]
TRIM_CHURN = 65536  # opens, closes and steps after which a sweep trims the C heap (what serving them freed goes back)


_U64 = (1 << 64) - 1
_FMIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _fmix(z: int) -> int:
    """splitmix64's finalizer on a 64-bit int: a bijection in which every input bit reaches every output bit."""
    z = ((z ^ (z >> 30)) * _FMIX[0]) & _U64
    z = ((z ^ (z >> 27)) * _FMIX[1]) & _U64
    return z ^ (z >> 31)


def _fmix_array(z: np.ndarray) -> np.ndarray:
    """`_fmix` of uint64s (numpy's uint64 products wrap as the masked ones do)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_FMIX[0])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_FMIX[1])
    return z ^ (z >> np.uint64(31))  # type: ignore[no-any-return]


def rows_digest(x: np.ndarray) -> bytes:
    """What identifies a step's rows for retries, 8 bytes, from the rows as row-major float32 (a session's
    column count is fixed by its model, so the bytes also fix the row count): rows of at most 7 bytes are
    kept as they are (their length + 1, then the bytes, zero-padded: never all zero, exact), larger ones
    as 8 bytes of BLAKE2b. Stored in snapshots: changing it makes every saved digest refuse its retry (the
    16-byte digests of older snapshots and store blobs are read as no digest kept)."""
    raw = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    if len(raw) < DIGEST_BYTES:
        return bytes((len(raw) + 1,)) + raw.ljust(DIGEST_BYTES - 1, b"\0")
    return hashlib.blake2b(raw, digest_size=DIGEST_BYTES).digest()


def _key(session_id: str) -> bytes | None:
    """The 16 id bytes of a well-formed id (32 lowercase hex characters, as handed out), else None."""
    try:
        key = bytes.fromhex(session_id)
    except ValueError:
        return None
    return key if len(key) == 16 and key.hex() == session_id else None


def rows_digests(x: np.ndarray) -> bytes:
    """rows_digest of each x[k] ([n, rows, features]), joined: n * 8 bytes, what `commit_block` takes.
    Steps of at most 7 bytes (one row of one feature) are done for all n at once, without hashing."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    n = len(a)
    if n == 0:
        return b""
    size = a.nbytes // n
    if size < DIGEST_BYTES:
        out = np.zeros((n, DIGEST_BYTES), np.uint8)
        out[:, 0] = size + 1
        out[:, 1 : 1 + size] = a.reshape(n, size // 4).view(np.uint8)
        return out.tobytes()
    raw = memoryview(a.tobytes())
    blake = hashlib.blake2b
    return b"".join([blake(raw[k : k + size], digest_size=DIGEST_BYTES).digest() for k in range(0, len(raw), size)])


def rows_digests_list(x: np.ndarray) -> list[bytes]:
    """rows_digest of each x[k], as a list (for callers of the former rows_digests)."""
    d = rows_digests(x)
    return [d[k : k + DIGEST_BYTES] for k in range(0, len(d), DIGEST_BYTES)]


class Closed(NamedTuple):
    """What is left of a closed session."""

    id: str
    model: str
    version: int
    steps: int


class Session:
    """A handle on one session: its id, model version and slot; what it knows is read from (and written
    to) its pool's columns. A handle outlives its session harmlessly: it then reads as `closed`."""

    __slots__ = ("_table", "code", "id", "key", "mv", "slot")

    def __init__(self, table: SessionTable, key: bytes, mv: ModelVersion, slot: int, code: int) -> None:
        self._table = table
        self.key = key
        self.id = key.hex()
        self.mv = mv  # the version it opened on: its runtime, batcher and state pool
        self.slot = slot
        self.code = code

    def _col(self, name: str) -> np.ndarray:
        return self.mv.pool.columns[name]

    @property
    def model(self) -> str:
        return self.mv.name

    @property
    def version(self) -> int:
        return self.mv.version

    @property
    def mine(self) -> bool:
        """The slot still belongs to this session (not freed and handed to another)."""
        return self.slot < self.mv.pool.capacity and self._col("id")[self.slot].tobytes() == self.key

    def _flags(self) -> int:
        return int(self._col("flags")[self.slot])

    @property
    def closed(self) -> bool:
        return not self.mine or self._flags() & LIVE_MASK != USED

    @property
    def busy(self) -> bool:
        return self.mine and bool(self._flags() & HELD)

    @property
    def owner(self) -> str | None:
        return self._table.owner_name(int(self._col("owner")[self.slot]))

    @property
    def last_seq(self) -> int:
        seq = int(self._col("last_seq")[self.slot])
        return self._table.big_seqs.get(self.code, seq) if seq == SEQ_BIG else seq

    @last_seq.setter
    def last_seq(self, value: int) -> None:
        self._col("last_seq")[self.slot] = min(value, SEQ_BIG)
        if value > SEQ_BIG:
            self._table.big_seqs[self.code] = value
        elif self._table.big_seqs:
            self._table.big_seqs.pop(self.code, None)

    @property
    def steps(self) -> int:
        return int(self._col("steps")[self.slot])

    @steps.setter
    def steps(self, value: int) -> None:
        self._col("steps")[self.slot] = min(value, STEPS_MAX)

    @property
    def last_used(self) -> float:
        """time.monotonic() of its last use."""
        return self._table.epoch + float(self._col("last_used")[self.slot])

    @last_used.setter
    def last_used(self, value: float) -> None:
        self._col("last_used")[self.slot] = value - self._table.epoch

    @property
    def last_digest(self) -> bytes:
        """rows_digest of last_seq's rows, b"" when none is kept."""
        digest = int(self._col("digest")[self.slot])
        return digest.to_bytes(DIGEST_BYTES, "little") if digest else b""

    @last_digest.setter
    def last_digest(self, value: bytes) -> None:
        """b"": none kept."""
        if len(value) not in (0, DIGEST_BYTES):
            raise ValueError(f"a rows digest is {DIGEST_BYTES} bytes, not {len(value)}")
        self._col("digest")[self.slot] = int.from_bytes(value, "little")

    @property
    def forecast(self) -> np.ndarray | None:
        """The answer to last_seq (a copy), [horizon, targets]."""
        if not self._flags() & ANSWERED:
            return None
        return np.array(self._col("forecast")[self.slot])

    @forecast.setter
    def forecast(self, y: np.ndarray | None) -> None:
        self._table.store_answers(self.mv, np.array([self.slot]), None if y is None else y[None], None)

    @property
    def quantile_forecast(self) -> np.ndarray | None:
        """For a quantile model, [horizon, targets, quantiles] for last_seq."""
        q = self.mv.pool.columns.get("quantile_forecast")
        if q is None or not self._flags() & ANSWERED:
            return None
        return np.array(q[self.slot])

    @quantile_forecast.setter
    def quantile_forecast(self, q: np.ndarray | None) -> None:
        if q is not None:
            column = self.mv.pool.add_column("quantile_forecast", np.float32, q.shape)
            column[self.slot] = q

    def hold(self) -> None:
        """Takes the turn of a free session (not `busy`) without a ticket; `release()` once done."""
        self._col("flags")[self.slot] |= HELD

    def queue_turn(self) -> asyncio.Future[None]:
        """A ticket for the next turn, taken synchronously so that arrival order is kept; it is already
        done when the session is free. Whoever holds a granted ticket must `release()` exactly once."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        flags = self._col("flags")
        if not flags[self.slot] & HELD:
            flags[self.slot] |= HELD
            ticket.set_result(None)
        else:
            self._table.waiting.setdefault(self.code, deque()).append(ticket)
        return ticket

    def release(self) -> None:
        """Hands the turn to the next live ticket, or frees the session."""
        line = self._table.waiting.get(self.code)
        while line:
            ticket = line.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self._table.waiting.pop(self.code, None)
        flags = self._col("flags")
        flags[self.slot] &= ~HELD & 0xFF
        if flags[self.slot] & CLOSING:  # closed while a step ran: nothing can write the slot now
            self._table.free_slot(self.mv, self.slot)

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
        last = self.last_seq
        if seq == last and seq > 0 and self._flags() & ANSWERED:
            kept = self.last_digest
            if digest is not None and kept and digest != kept:
                raise FailedPrecondition(
                    f"session {self.id}: sequence {seq} was already applied with different rows; a retry must "
                    f"resend the same rows, new rows take sequence {last + 1}"
                )
            return True
        if seq != last + 1:
            raise FailedPrecondition(
                f"session {self.id}: sequence {seq} is out of order; expected {last + 1}"
                + (f" (or {last} to repeat the last step)" if last else "")
            )
        return False

    def committer(self, seq: int, rows: int, digest: bytes = b"") -> Callable[[Output], None]:
        def commit(out: Output) -> None:
            table, slot = self._table, np.array([self.slot])
            kept, last = table.recorded(self.mv, self.slot), self.last_seq
            try:
                table.store_answers(self.mv, slot, out.y[None], None if out.q is None else out.q[None])
                cols = self.mv.pool.columns
                self.last_seq = seq
                cols["steps"][self.slot] = min(STEPS_MAX, int(cols["steps"][self.slot]) + rows)
                self.last_digest = digest
                cols["last_used"][self.slot] = time.monotonic() - table.epoch
                table._churn += 1
                if table.store is not None and seq % table.store.every == 0:
                    table.store.save(self.mv, [self])
            except BaseException:  # recorded all or nothing: the caller puts the state back and answers
                table.put_back(self.mv, self.slot, kept)
                self.last_seq = last
                raise

        return commit


class SessionTable:
    """All live sessions of the server, found by id; slots and bookkeeping columns come from each model
    version's pool. Model versions with sessions are numbered (the high half of a code)."""

    def __init__(self, metrics: Metrics, idle_s: float, max_per_owner: int | None = None) -> None:
        self._metrics = metrics
        self.idle_s = idle_s
        self.epoch = time.monotonic()  # `last_used` columns count seconds from here
        # the index: entry = packed code + 1 (0: empty); a code (number << 32 | slot) is packed as
        # number << _shift | slot, in uint32 while every entry fits (see _layout), else int64 with _shift 32
        self._shift = 32
        self._index: np.ndarray = np.zeros(MIN_INDEX, np.uint32)
        self._count = 0
        # an id's home in the index is a keyed hash of both its words (`_home`), the keys drawn per table: a
        # client that proposes its ids (OpenSession's SESSION_HEADER) cannot pick ids that share a home, whose
        # cluster every lookup would walk in Python on the event loop (the home was the id's second word)
        self._keys = (secrets.randbits(64), secrets.randbits(64))
        self._churn = 0  # opens, closes and steps since the heap was last trimmed
        self._mvs: dict[int, ModelVersion] = {}  # number -> version, while it has slots in use
        self._numbers: dict[int, int] = {}  # id(version) -> number (the lowest free one: numbers stay small)
        self.waiting: dict[int, deque[asyncio.Future[None]]] = {}  # code -> tickets waiting for the turn
        self.big_seqs: dict[int, int] = {}  # code -> last_seq of the sessions past 2**32 - 1 steps (see SEQ_BIG)
        # security (issue 8, docs/readme/security.md): live sessions per owner identity, so one client cannot
        # take every slot; kept by open/restore/_remove, checked in open. Keep it in any rework of the table.
        self.max_per_owner = max_per_owner
        self._owned: Counter[str] = Counter()
        self._owner_numbers: dict[str, int] = {}  # identity -> its number in the `owner` column (1, 2, ...)
        self._owner_names: dict[int, str] = {}
        self.store: SessionStore | None = None  # issue 12: sessions kept in Redis too (service.store sets it)
        # sessions removed so far (closed, expired, taken back): while it has not moved, every code found for
        # an id is still that live session (slots never move), so a stream's known sessions need no check
        self.removed = 0

    def __len__(self) -> int:
        return self._count

    # --- model versions and owners as numbers -------------------------------------------------------

    def _number(self, mv: ModelVersion) -> int:
        number = self._numbers.get(id(mv))
        if number is None:
            number = next(n for n in itertools.count(1) if n not in self._mvs)
            self._numbers[id(mv)] = number
            self._mvs[number] = mv
            for name, (dtype, shape) in COLUMNS.items():
                mv.pool.add_column(name, dtype, shape)
            if self._layout() != (self._shift, self._index.dtype):
                self._rebuild(len(self._index))  # packs the entries anew
        return number

    def owner_name(self, number: int) -> str | None:
        return self._owner_names.get(number) if number else None

    def _take_owner(self, owner: str | None) -> int:
        if owner is None:
            return 0
        number = self._owner_numbers.get(owner)
        if number is None:
            number = max(self._owner_names, default=0) + 1
            if number > MAX_OWNERS:
                if len(self._owner_names) >= MAX_OWNERS:
                    raise ResourceExhausted(
                        f"{MAX_OWNERS} client identities hold live sessions, the most this server tells apart; "
                        "retry once some of their sessions have closed or expired"
                    )
                number = next(n for n in itertools.count(1) if n not in self._owner_names)
            self._owner_numbers[owner] = number
            self._owner_names[number] = owner
        self._owned[owner] += 1
        return number

    def _drop_owner(self, number: int, sessions: int = 1) -> None:
        owner = self._owner_names.get(number)
        if owner is None:
            return
        self._owned[owner] -= sessions
        if not self._owned[owner]:
            del self._owned[owner], self._owner_numbers[owner], self._owner_names[number]

    # --- the id index -------------------------------------------------------------------------------

    def _layout(self) -> tuple[int, np.dtype[np.generic]]:
        """The packing the numbered versions need: slot bits for the largest pool cap, uint32 when the
        highest number still fits beside them."""
        shift = max([(mv.pool.cap - 1).bit_length() for mv in self._mvs.values()] + [1])
        if (max(self._mvs, default=0) + 1) << shift < 1 << 32:
            return shift, np.dtype(np.uint32)
        return 32, np.dtype(np.int64)

    def _entry(self, code: int) -> int:
        return ((code >> 32) << self._shift | code & SLOT_MASK) + 1

    def _code(self, entry: int) -> int:
        e = entry - 1
        return (e >> self._shift) << 32 | e & ((1 << self._shift) - 1)

    def _codes(self, entries: np.ndarray) -> np.ndarray:
        """_code of many nonzero entries: int64 codes."""
        e = entries.astype(np.int64) - 1
        if self._shift == 32:
            return e
        return ((e >> self._shift) << 32) | (e & ((1 << self._shift) - 1))

    def _id_words(self, code: int) -> np.ndarray:
        return self._mvs[code >> 32].pool.columns["id"][code & SLOT_MASK]

    def _home(self, w0: int, w1: int) -> int:
        """The keyed hash of an id's two words (the index position is its low bits): each word mixed in
        through splitmix64's finalizer, so every bit of either word reaches every bit of the hash."""
        k0, k1 = self._keys
        return _fmix(_fmix(w0 ^ k0) ^ w1 ^ k1)

    def _homes(self, words: np.ndarray) -> np.ndarray:
        """`_home` of many ids ([n, 2] uint64 words): uint64."""
        k0, k1 = (np.uint64(k) for k in self._keys)
        return _fmix_array(_fmix_array(words[:, 0] ^ k0) ^ words[:, 1] ^ k1)

    def _key_home(self, key: bytes) -> int:
        return self._home(int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little"))

    def _find(self, key: bytes) -> tuple[int, int]:
        """(position in the index, code) of the live session with this id, or (-1, -1)."""
        index, mask = self._index, len(self._index) - 1
        i = self._key_home(key) & mask
        while True:
            e = int(index[i])
            if e == 0:
                return -1, -1
            code = self._code(e)
            if self._id_words(code).tobytes() == key:
                return i, code
            i = (i + 1) & mask

    def _insert(self, key: bytes, code: int) -> None:
        """Adds an entry; room was made beforehand (`_make_room`, before the slot became live)."""
        index, mask = self._index, len(self._index) - 1
        i = self._key_home(key) & mask
        while index[i]:
            i = (i + 1) & mask
        index[i] = self._entry(code)
        self._count += 1

    def _make_room(self) -> None:
        if 2 * (self._count + 1) > len(self._index):
            self._rebuild(2 * len(self._index))

    def _delete(self, i: int) -> None:
        """Empties position i (its slot no longer live), shifting later entries of its cluster back (no tombstones)."""
        index, mask = self._index, len(self._index) - 1
        j = i
        while True:
            j = (j + 1) & mask
            e = int(index[j])
            if e == 0:
                break
            w = self._id_words(self._code(e))
            home = self._home(int(w[0]), int(w[1])) & mask
            if (j - home) & mask >= (j - i) & mask:  # i lies between its home and j: it may move back to i
                index[i] = e
                i = j
        index[i] = 0
        self._count -= 1
        if 8 * self._count < len(self._index) and len(self._index) > MIN_INDEX:
            self._rebuild(len(self._index) // 2)

    def _rebuild(self, size: int) -> None:
        """A fresh index of `size` positions holding every live session, placed in vectorised rounds: each
        round puts every entry whose probe position is empty there (one per position), the others move on."""
        shrinking = size < len(self._index)
        self._shift, dtype = self._layout()
        entries, homes = [], []
        for number, mv in self._mvs.items():
            cols = mv.pool.columns
            slots = np.flatnonzero(cols["flags"] & LIVE_MASK == USED)
            entries.append(((np.int64(number) << self._shift) | slots.astype(np.int64)) + 1)
            homes.append(self._homes(cols["id"][slots]))
        index = np.zeros(size, dtype)
        mask = size - 1
        entry = np.concatenate(entries).astype(dtype) if entries else np.zeros(0, dtype)
        pos = (np.concatenate(homes) & np.uint64(mask)).astype(np.int64) if homes else np.zeros(0, np.int64)
        del entries, homes
        while entry.size:
            empty = index[pos] == 0
            places, first = np.unique(pos[empty], return_index=True)
            winners = np.flatnonzero(empty)[first]
            index[places] = entry[winners]
            left = np.ones(entry.size, np.bool_)
            left[winners] = False
            entry, pos = entry[left], (pos[left] + 1) & mask
        self._index = index
        if shrinking or size >= 1 << 16:
            trim_heap()

    # --- sessions -----------------------------------------------------------------------------------

    def _handle(self, key: bytes, code: int) -> Session:
        return Session(self, key, self._mvs[code >> 32], code & SLOT_MASK, code)

    def open(self, mv: ModelVersion, owner: str | None = None, session_id: str | None = None) -> Session:
        """`session_id` (32 lowercase hex characters, checked by the caller) is the id a client proposed so
        that a proxy can route the session by it from its first call; ALREADY_EXISTS when it is live."""
        labels = (mv.name, str(mv.version))
        if owner is not None and self.max_per_owner is not None and self._owned[owner] >= self.max_per_owner:
            self._metrics.sessions_rejected.labels(*labels).inc()
            raise ResourceExhausted(
                f"{owner} holds {self._owned[owner]} live session(s), the most one client identity may hold "
                f"(max_sessions_per_identity / GATECAST_MAX_SESSIONS_PER_IDENTITY = {self.max_per_owner}); "
                "close one or let it expire"
            )
        if session_id is not None:
            key = bytes.fromhex(session_id)
            if self._find(key)[1] >= 0:
                self._metrics.sessions_rejected.labels(*labels).inc()
                raise AlreadyExists(
                    f"session id {session_id} (metadata {SESSION_HEADER}) is live already; propose another "
                    "(128 random bits) or none"
                )
        else:
            key = secrets.token_bytes(16)
            while self._find(key)[1] >= 0:  # 2^-128: never, but an id must not be handed out twice
                key = secrets.token_bytes(16)
        try:
            session = self._add(mv, key, owner)
        except ResourceExhausted:
            self._metrics.sessions_rejected.labels(*labels).inc()
            raise
        self._metrics.sessions_opened.labels(*labels).inc()
        return session

    def _add(self, mv: ModelVersion, key: bytes, owner: str | None) -> Session:
        number = self._number(mv)
        self._make_room()
        slot = mv.pool.acquire()
        cols = mv.pool.columns
        try:
            cols["owner"][slot] = self._take_owner(owner)
        except ResourceExhausted:
            self.removed += 1
            mv.pool.release(slot)
            if mv.pool.used == 0:
                del self._mvs[self._numbers.pop(id(mv))]
            raise
        cols["id"][slot] = np.frombuffer(key, "<u8")
        cols["last_used"][slot] = time.monotonic() - self.epoch
        code = (number << 32) | slot
        self._insert(key, code)
        self._churn += 1
        self._metrics.live_sessions.labels(mv.name, str(mv.version)).inc()
        return self._handle(key, code)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """Another identity's session is answered like a missing one (NOT_FOUND): its existence does not leak."""
        key = _key(session_id)
        code = -1 if key is None else self._find(key)[1]
        session = None if key is None or code < 0 else self._handle(key, code)
        if session is None or ((o := session.owner) is not None and o != owner):
            raise NotFound(
                f"session {session_id!r} not found: it was closed, expired after {self.idle_s:.0f} s idle, "
                "or never existed; open a new one"
            )
        return session

    def _remove(self, session: Session) -> None:
        if session.closed:
            return
        self.removed += 1
        i, _ = self._find(session.key)
        mv, slot = session.mv, session.slot
        cols = mv.pool.columns
        self._drop_owner(int(cols["owner"][slot]))
        cols["owner"][slot] = 0
        if cols["flags"][slot] & HELD:  # a step may still write the slot: free it when the session's turn is let go
            cols["flags"][slot] |= CLOSING
        else:
            self.free_slot(mv, slot)
        self._delete(i)
        self._churn += 1
        self._metrics.live_sessions.labels(mv.name, str(mv.version)).dec()

    def free_slot(self, mv: ModelVersion, slot: int) -> None:
        self.removed += 1
        if self.big_seqs:
            self.big_seqs.pop((self._numbers[id(mv)] << 32) | slot, None)
        mv.pool.release(slot)
        if mv.pool.used == 0:  # forget the version: an unloaded one must not be kept alive from here
            del self._mvs[self._numbers.pop(id(mv))]

    async def close(self, session_id: str, owner: str | None = None) -> Closed:
        """A session held by the store but not here is taken over first; the store keeps a tombstone."""
        if self.locate(session_id) < 0 and (load := self.recover(session_id, owner)) is not None:
            await load
        session = self.get(session_id, owner)
        await session.take()  # let an in-flight step finish before the slot is freed
        try:
            if session.closed:
                raise NotFound(f"session {session_id!r} not found: it was closed")
            closed = Closed(session.id, session.model, session.version, session.steps)
            self._remove(session)
        finally:
            session.release()
        self._metrics.sessions_closed.labels(closed.model, str(closed.version)).inc()
        if self.store is not None:
            await self.store.closed(closed.id)
        return closed

    # --- issue 12: the session store (service.store) ----------------------------------------------------

    def recover(self, session_id: str, owner: str | None) -> asyncio.Future[bool] | None:
        """For an id not live here: a future of whether the store held it and it is live here now; None when
        there is no store or the id is malformed (NOT_FOUND at once, Redis is not asked)."""
        if self.store is None or _key(session_id) is None:
            return None
        return self.store.recover(session_id, owner)

    def stored(self, step: asyncio.Future[Output], ids: list[str]) -> asyncio.Future[Output]:
        """`step`, answered only once what it recorded for these sessions is in the store (when there is one)."""
        return step if self.store is None else self.store.after(step, ids)

    async def opened(self, session: Session) -> None:
        """A new session goes to the store before its id goes to the client; ALREADY_EXISTS (and the session is
        discarded) when the store knows its id already (a proposed id live or closed on another replica)."""
        if self.store is not None and not await self.store.opened(session):
            self.discard(session)
            raise AlreadyExists(f"session id {session.id} is in the session store already; propose another or none")

    def forget(self, session_id: str) -> None:
        """Removes a session another replica has taken over (the store refused this one's write)."""
        code = self.locate(session_id)
        if code >= 0:
            self._remove(self._handle(bytes.fromhex(session_id), code))

    def discard(self, session: Session) -> None:
        """Removes a session whose opening failed."""
        self._remove(session)

    def expire(self, now: float | None = None) -> int:
        """Removes sessions idle longer than idle_s that have no step in flight: one vectorised pass over
        each version's columns finds them."""
        now = time.monotonic() if now is None else now
        expired = 0
        for number, mv in list(self._mvs.items()):
            cols = mv.pool.columns
            idle = (cols["flags"] & (LIVE_MASK | HELD) == USED) & (
                cols["last_used"] < np.float32(now - self.epoch - self.idle_s)
            )
            slots = np.flatnonzero(idle)
            if len(slots) * 8 <= self._count:  # a few: each out of the index on its own
                for slot in slots.tolist():
                    self._remove(self._handle(cols["id"][slot].tobytes(), (number << 32) | slot))
                    cols = mv.pool.columns  # removing may shrink the pool
            elif len(slots):  # many: freed in one write per column, the index rebuilt once
                self.removed += len(slots)
                for owner, n in zip(*np.unique(cols["owner"][slots], return_counts=True), strict=True):
                    self._drop_owner(int(owner), int(n))
                for slot in slots[cols["last_seq"][slots] == SEQ_BIG].tolist():
                    self.big_seqs.pop((number << 32) | slot, None)
                mv.pool.release(slots)
                self._count -= len(slots)
                self._rebuild(max(MIN_INDEX, 1 << (2 * self._count + 1).bit_length()))
                self._metrics.live_sessions.labels(mv.name, str(mv.version)).dec(len(slots))
                if mv.pool.used == 0:
                    del self._mvs[self._numbers.pop(id(mv))]
            expired += len(slots)
            if len(slots):
                self._metrics.sessions_expired.labels(mv.name, str(mv.version)).inc(len(slots))
        if expired:
            log.info("expired %d idle session(s)", expired)
        if self._churn >= TRIM_CHURN:
            self._churn = 0
            trim_heap()
        return expired

    def store_answers(self, mv: ModelVersion, slots: np.ndarray, y: np.ndarray | None, q: np.ndarray | None) -> None:
        """Keeps each slot's answer to its last sequence (y [n, horizon, targets], q with quantiles)."""
        flags = mv.pool.columns["flags"]
        if y is None:
            flags[slots] &= ~ANSWERED & 0xFF
            return
        mv.pool.add_column("forecast", np.float32, y.shape[1:])[slots] = y
        if q is not None:
            mv.pool.add_column("quantile_forecast", np.float32, q.shape[1:])[slots] = q
        flags[slots] |= ANSWERED

    def locate(self, session_id: str) -> int:
        """The code of the live session with this id (32 lowercase hex characters), else -1."""
        key = _key(session_id)
        return -1 if key is None else self._find(key)[1]

    def locate_many(self, session_ids: list[str]) -> list[int]:
        """`locate` for many ids at once: the index probed for all of them in vectorised rounds."""
        n = len(session_ids)
        joined = "".join(session_ids)
        try:
            raw = bytes.fromhex(joined)
        except ValueError:
            raw = b""
        if len(raw) != 16 * n or raw.hex() != joined or set(map(len, session_ids)) != {32}:
            return [self.locate(s) for s in session_ids]  # some id is malformed: one at a time
        return self.locate_words(np.frombuffer(raw, "<u8").reshape(n, 2)).tolist()  # type: ignore[no-any-return]

    def locate_words(self, words: np.ndarray) -> np.ndarray:
        """`locate_many` for ids already as the `id` column keeps them ([n, 2] little-endian words): int64
        codes, -1 where no live session has that id."""
        n = len(words)
        mask = len(self._index) - 1
        pos = (self._homes(words) & np.uint64(mask)).astype(np.int64)
        found = np.full(n, -1, np.int64)
        todo = np.arange(n)
        only = next(iter(self._mvs)) if len(self._mvs) == 1 else None
        for _ in range(3):  # most ids sit within a few positions of their home; the rest are probed singly
            if not todo.size:
                break
            entry = self._index[pos[todo]]
            todo, code = todo[entry > 0], self._codes(entry[entry > 0])  # an empty position: not found
            match = np.zeros(todo.size, np.bool_)
            for number in [only] if only is not None else np.unique(code >> 32).tolist():
                mine = (code >> 32) == number
                ids = self._mvs[number].pool.columns["id"][code[mine] & SLOT_MASK]
                theirs = words[todo[mine]]
                match[mine] = (ids[:, 0] == theirs[:, 0]) & (ids[:, 1] == theirs[:, 1])
            found[todo[match]] = code[match]
            todo = todo[~match]
            pos[todo] = (pos[todo] + 1) & mask
        for i in todo.tolist():
            found[i] = self._find(words[i].tobytes())[1]
        return found

    def still_live(self, codes: np.ndarray, words: np.ndarray) -> bool:
        """Whether every code (from an earlier `locate_words` of these ids) is still that live session: a
        stream that names the same sessions message after message checks them instead of probing again."""
        numbers = codes >> 32
        number = int(numbers[0]) if codes.size else 0
        if not codes.size or codes.min() < 0 or (numbers != number).any() or (mv := self._mvs.get(number)) is None:
            return False  # a session not found, or several versions: looked up again
        slots = codes & SLOT_MASK
        cols = mv.pool.columns
        if slots.max() >= len(cols["flags"]):
            return False
        return bool(((cols["flags"][slots] & LIVE_MASK) == USED).all() and (cols["id"][slots] == words).all())

    def version(self, number: int) -> ModelVersion:
        return self._mvs[number]

    def claim(self, mv: ModelVersion, slots: np.ndarray, seqs: np.ndarray, owner: str | None) -> np.ndarray:
        """For steps of distinct live sessions of one version: which are the next step of a free session
        that `owner` may reach. Their turns are taken now; `release_block` gives them back. A session at
        SEQ_BIG steps or more is left to the single-step path (its sequence is not all in its column)."""
        cols = mv.pool.columns
        flags = cols["flags"]
        last = cols["last_seq"][slots]
        ok = (seqs == last + np.uint64(1)) & (last != SEQ_BIG) & (flags[slots] & HELD == 0)
        if self._owned:  # some session has an owner: only its own or unowned ones are within reach
            whose = cols["owner"][slots]
            number = self._owner_numbers.get(owner, 0) if owner is not None else 0
            ok &= whose == 0 if not number else (whose == 0) | (whose == number)
        if np.count_nonzero(ok) == len(ok):  # a third of the time of ok.all()
            flags[slots] |= HELD
        else:
            flags[slots[ok]] |= HELD
        return ok

    def claim_step(
        self, chars: bytes, seq: int, cols: int, owner: str | None, known: dict[bytes, Known]
    ) -> tuple[ModelVersion, int] | None:
        """`claim` for one step of one row (`cols` features) of the session whose id is `chars` (32
        characters): its version and slot when the session is live, free, reachable by `owner`, takes `cols`
        features and `seq` is its next step; its turn is then taken (`release_block` gives it back). None for
        anything else (a step for the single way, which says what is wrong), with nothing taken.

        `known` (a stream's) remembers where the ids it named were found: such an id is checked at its slot
        (the live session there still has that id) instead of looked up again."""
        hit = known.get(chars)
        if hit is not None:
            mv, slot, key, n_features, low, high = hit
            columns = mv.pool.columns
            flags = columns["flags"]
            ids = columns["id"]
            if (
                slot >= len(flags)
                or ids.item(slot, 1) != high
                or ids.item(slot, 0) != low
                or flags.item(slot) & LIVE_MASK != USED
            ):
                hit = None  # no longer the live session with that id: looked up again
        if hit is None:
            key = session_key(chars)  # type: ignore[assignment]
            if key is None:
                return None
            code = self._find(key)[1]
            if code < 0:
                return None
            mv, slot = self._mvs[code >> 32], code & SLOT_MASK
            n_features = mv.runtime.manifest.n_features
            if len(known) < KNOWN_IDS:
                low, high = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
                known[chars] = (mv, slot, key, n_features, low, high)
            columns = mv.pool.columns
            flags = columns["flags"]
        f = flags.item(slot)
        if f & (LIVE_MASK | HELD) != USED or n_features != cols:
            return None
        whose = columns["owner"].item(slot)
        if whose and whose != (self._owner_numbers.get(owner, 0) if owner is not None else 0):
            return None
        last = columns["last_seq"].item(slot)
        if seq != last + 1 or last == SEQ_BIG:
            return None
        flags[slot] = f | HELD
        return mv, slot

    def release_block(self, mv: ModelVersion, slots: np.ndarray) -> None:
        """Gives the turns `claim` took back: in one write, unless a session has steps waiting for its turn
        or was closed meanwhile (then one at a time)."""
        cols = mv.pool.columns
        number = self._numbers[id(mv)]
        flags = cols["flags"]
        held = flags[slots]
        special = held & LIVE_MASK != USED
        if self.waiting:
            special |= np.array([((number << 32) | s) in self.waiting for s in slots.tolist()], np.bool_)
        if not np.count_nonzero(special):
            flags[slots] = held & (~HELD & 0xFF)
            return
        flags[slots[~special]] &= ~HELD & 0xFF
        for slot in slots[special].tolist():
            self._handle(cols["id"][slot].tobytes(), (number << 32) | slot).release()
            cols = mv.pool.columns

    def commit_block(
        self,
        mv: ModelVersion,
        slots: np.ndarray,
        seqs: list[int] | np.ndarray,
        rows: int,
        digests: bytes,
        out: Output,
    ) -> None:
        """Records applied steps of many sessions at once (a block run by the batcher, `rows` each; `digests`
        their rows_digests, 8 bytes each): all of it, or (raising) none of it."""
        kept = self.recorded(mv, slots)
        try:
            self.store_answers(mv, slots, out.y, out.q)
            cols = mv.pool.columns
            cols["last_seq"][slots] = seqs  # claimed: each at most SEQ_BIG, which needs no big_seqs entry
            steps = cols["steps"]
            steps[slots] = np.minimum(steps[slots], np.uint32(STEPS_MAX - rows)) + np.uint32(rows)  # saturates
            cols["digest"][slots] = np.frombuffer(digests, "<u8")
            cols["last_used"][slots] = time.monotonic() - self.epoch
            self._churn += len(slots)
            if self.store is not None:
                saved = slots[np.asarray(seqs, np.uint64) % np.uint64(self.store.every) == 0]
                codes = (np.int64(self._numbers[id(mv)]) << 32) | saved.astype(np.int64)
                self.store.save(mv, self.handles(codes, cols["id"][saved]))
        except BaseException:
            self.put_back(mv, slots, kept)
            raise

    @staticmethod
    def recorded(mv: ModelVersion, slots: np.ndarray | int) -> list[tuple[str, Any]]:
        """What recording a step writes in these slots' columns (one slot: an int), copied: for `put_back` when
        the recording fails partway."""
        kept = []
        for k in RECORD_COLUMNS:
            col = mv.pool.columns.get(k)
            if col is not None:
                values = col[slots]  # a copy, except one slot's row of a column of rows (a view): copied
                kept.append((k, values.copy() if isinstance(slots, int) and col.ndim > 1 else values))
        return kept

    @staticmethod
    def put_back(mv: ModelVersion, slots: np.ndarray | int, kept: list[tuple[str, Any]]) -> None:
        cols = mv.pool.columns
        for k, values in kept:
            cols[k][slots] = values

    # --- for service.snapshot: the table as values, and a session re-created under its own id ----------

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Codes [n] and ids [n, 2] of every live session: 24 bytes each to read handles from, chunk by chunk."""
        codes, ids = [np.zeros(0, np.int64)], [np.zeros((0, 2), np.uint64)]
        for number, mv in self._mvs.items():
            cols = mv.pool.columns
            slots = np.flatnonzero(cols["flags"] & LIVE_MASK == USED)
            codes.append((np.int64(number) << 32) | slots.astype(np.int64))
            ids.append(cols["id"][slots])
        return np.concatenate(codes), np.concatenate(ids)

    def handles(self, codes: np.ndarray, ids: np.ndarray) -> list[Session]:
        """Handles for entries of `live()` still live under the same id."""
        out = []
        raw = np.ascontiguousarray(ids, "<u8").tobytes()
        for k, code in enumerate(codes.tolist()):
            if code >> 32 in self._mvs:
                s = self._handle(raw[16 * k : 16 * k + 16], code)
                if not s.closed:
                    out.append(s)
        return out

    def restore(self, mv: ModelVersion, session_id: str, states: list[np.ndarray], owner: str | None = None) -> Session:
        """Re-creates a saved session with its state tensors ([dims0, dims1] each, in manifest order); the
        caller sets its sequence bookkeeping. Raises ValueError if the id is live or malformed,
        ResourceExhausted if full."""
        key = _key(session_id)
        if key is None:
            raise ValueError(f"session id {session_id!r} is not 32 lowercase hex characters")
        if self._find(key)[1] >= 0:
            raise ValueError(f"session {session_id} is already live")
        session = self._add(mv, key, owner)  # the owner a snapshot or store blob names (older blobs: none)
        mv.pool.scatter(np.array([session.slot], dtype=np.int64), [a[:, None, :] for a in states])
        return session
