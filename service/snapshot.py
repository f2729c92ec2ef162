"""Session snapshots: every live session as a self-contained, versioned blob, and a file of them.

The format is documented in docs/snapshot.md. A session blob is the unit: the restart snapshot is a
header followed by blobs, and the same blob is what moves one session between servers or sits in a
store. Nothing here can run code: a blob is a JSON header (parsed with `json`) and raw little-endian
float32 tensors (read with numpy), checked by a CRC-32; no pickle.

    session blob  := b"GCSESS\\0\\0"  u16 format  u16 flags(0)  u32 meta_len  meta(JSON, UTF-8)
                     tensor bytes (float32 LE, C order, in meta["tensors"] order)  u32 crc32(all before)
    snapshot file := b"GCSNAP\\0\\0"  u16 format  u16 flags(0)  u32 header_len  header(JSON)  u32 crc32(all before)
                     { u32 blob_len (> 0)  blob } ...  u32 0  b"GCEND\\0\\0\\0"  u32 number of blobs

Writing is atomic: a temporary file in the same folder, fsync, rename over the old file, fsync of the
folder. A session with a step in flight at snapshot time is written as it was in the previous snapshot
(its pool state may already hold the step's result while its sequence number does not yet): state and
sequence number always agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gatecast.errors import UserError

from .errors import NotFound
from .repository import ModelVersion, Repository
from .sessions import DIGEST_BYTES, Session, SessionTable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SESSION_MAGIC = b"GCSESS\0\0"
FILE_MAGIC = b"GCSNAP\0\0"
END_MAGIC = b"GCEND\0\0\0"
_PREFIX = struct.Struct("<8sHHI")  # magic, format version, flags, JSON length
_U32 = struct.Struct("<I")
MAX_JSON = 1 << 20  # a header or session meta larger than this is corrupt
CAPTURE_CHUNK = 4096  # sessions read on the event loop at a time, then written in a thread


class SnapshotError(UserError):
    """A snapshot (or one session blob) cannot be read: corrupt, truncated, or of an unknown format."""


@dataclass
class SessionRecord:
    """One session as a value, independent of any server: what a blob holds."""

    id: str
    model: str
    version: int
    onnx_sha256: str  # the graph the state belongs to; a state is meaningless for another graph
    last_seq: int
    steps: int
    states: dict[str, np.ndarray]  # manifest state input name -> [dims0, dims1] float32
    forecast: np.ndarray | None = None  # the answer to last_seq: [horizon, targets]
    quantile_forecast: np.ndarray | None = None  # quantile models: [horizon, targets, quantiles] for last_seq
    last_digest: str | None = None  # hex digest of the rows of last_seq (a retry must resend the same rows)
    idle_s: float = 0.0  # seconds since last use when written
    owner: str | None = None  # the client identity that opened it (None: none); absent from older blobs
    extra: dict[str, Any] = field(default_factory=dict)  # unknown meta keys, kept for forward compatibility


def _tensor_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def encode_session(r: SessionRecord) -> bytes:
    tensors: list[tuple[str, np.ndarray]] = [(f"state:{k}", v) for k, v in r.states.items()]
    if r.forecast is not None:
        tensors.append(("forecast", r.forecast))
    if r.quantile_forecast is not None:
        tensors.append(("quantile_forecast", r.quantile_forecast))
    meta = {
        **r.extra,
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "onnx_sha256": r.onnx_sha256,
        "last_seq": r.last_seq,
        "steps": r.steps,
        "last_digest": r.last_digest,
        "idle_s": round(r.idle_s, 3),
        "owner": r.owner,
        "tensors": [{"name": n, "dtype": "float32", "shape": list(a.shape)} for n, a in tensors],
    }
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    body = b"".join(
        [_PREFIX.pack(SESSION_MAGIC, FORMAT_VERSION, 0, len(meta_bytes)), meta_bytes]
        + [_tensor_bytes(a) for _, a in tensors]
    )
    return body + _U32.pack(zlib.crc32(body))


def decode_session(blob: bytes) -> SessionRecord:
    """Reads one session blob; raises SnapshotError saying what is wrong with it."""
    if len(blob) < _PREFIX.size + _U32.size:
        raise SnapshotError(f"session blob of {len(blob)} bytes is too short")
    magic, fmt, _flags, meta_len = _PREFIX.unpack_from(blob)
    if magic != SESSION_MAGIC:
        raise SnapshotError(f"not a gatecast session blob (magic {magic!r})")
    if fmt != FORMAT_VERSION:
        raise SnapshotError(f"session blob format {fmt}; this server reads format {FORMAT_VERSION}")
    (crc,) = _U32.unpack_from(blob, len(blob) - _U32.size)
    if zlib.crc32(memoryview(blob)[: -_U32.size]) != crc:
        raise SnapshotError("session blob checksum mismatch (corrupt)")
    if meta_len > MAX_JSON or _PREFIX.size + meta_len > len(blob) - _U32.size:
        raise SnapshotError(f"session blob meta length {meta_len} is out of range")
    try:
        meta = json.loads(blob[_PREFIX.size : _PREFIX.size + meta_len])
        pos = _PREFIX.size + meta_len
        arrays: dict[str, np.ndarray] = {}
        for t in meta["tensors"]:
            if t["dtype"] != "float32":
                raise SnapshotError(f"tensor {t['name']}: dtype {t['dtype']}, expected float32")
            shape = tuple(int(d) for d in t["shape"])
            n = math.prod(shape) * 4
            if pos + n > len(blob) - _U32.size:
                raise SnapshotError(f"tensor {t['name']} runs past the end of the blob")
            arrays[t["name"]] = np.frombuffer(blob, "<f4", n // 4, pos).astype(np.float32, copy=True).reshape(shape)
            pos += n
        if pos != len(blob) - _U32.size:
            raise SnapshotError(f"{len(blob) - _U32.size - pos} unexplained bytes after the tensors")
        known = {"id", "model", "version", "onnx_sha256", "last_seq", "steps", "last_digest", "idle_s", "owner"}
        known.add("tensors")
        return SessionRecord(
            id=str(meta["id"]),
            model=str(meta["model"]),
            version=int(meta["version"]),
            onnx_sha256=str(meta["onnx_sha256"]),
            last_seq=int(meta["last_seq"]),
            steps=int(meta["steps"]),
            states={k.removeprefix("state:"): v for k, v in arrays.items() if k.startswith("state:")},
            forecast=arrays.get("forecast"),
            quantile_forecast=arrays.get("quantile_forecast"),
            last_digest=None if meta.get("last_digest") is None else str(meta["last_digest"]),
            idle_s=float(meta.get("idle_s", 0.0)),
            owner=None if meta.get("owner") is None else str(meta["owner"]),
            extra={k: v for k, v in meta.items() if k not in known},
        )
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"session blob meta is malformed: {e!r}") from e


# --- the snapshot file ------------------------------------------------------------------------------


def encode_header() -> bytes:
    header = json.dumps({"created": datetime.now(UTC).isoformat(), "writer": "gatecast", "pid": os.getpid()}).encode()
    body = _PREFIX.pack(FILE_MAGIC, FORMAT_VERSION, 0, len(header)) + header
    return body + _U32.pack(zlib.crc32(body))


class SnapshotWriter:
    """Writes a snapshot file a few blobs at a time, so memory stays bounded however many sessions there
    are. Nothing is visible at `path` until `commit` (temporary file, fsync, rename, fsync of the folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        self.index: dict[str, tuple[int, int]] = {}  # session id -> (offset, length) of its blob
        self._f = self.tmp.open("wb")
        self._f.write(encode_header())

    def add(self, blob: bytes, session_id: str | None = None) -> None:
        self._f.write(_U32.pack(len(blob)))
        self.index[session_id if session_id is not None else _blob_id(blob)] = (self._f.tell(), len(blob))
        self._f.write(blob)

    def commit(self) -> dict[str, tuple[int, int]]:
        try:
            self._f.write(_U32.pack(0) + END_MAGIC + _U32.pack(len(self.index)))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.index

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_file(path: Path, blobs: list[bytes]) -> dict[str, tuple[int, int]]:
    """Writes blobs as a snapshot file atomically; returns {session id: (offset, length)} of each blob."""
    writer = SnapshotWriter(path)
    try:
        for blob in blobs:
            writer.add(blob)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _blob_id(blob: bytes) -> str:
    _, _, _, meta_len = _PREFIX.unpack_from(blob)
    return str(json.loads(blob[_PREFIX.size : _PREFIX.size + meta_len])["id"])


def read_file(path: Path) -> list[SessionRecord]:
    """Every session of a snapshot file; raises SnapshotError naming the file and the problem."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: cannot be read: {e.strerror or e}") from e
    try:
        return [decode_session(b) for b in _split(data)]
    except SnapshotError as e:
        raise SnapshotError(
            f"snapshot {path} is corrupt or not a gatecast snapshot ({e}); move it away to start without its sessions"
        ) from e


def _split(data: bytes) -> list[bytes]:
    if len(data) < _PREFIX.size:
        raise SnapshotError(f"{len(data)} bytes, too short for a header")
    magic, fmt, _flags, header_len = _PREFIX.unpack_from(data)
    if magic != FILE_MAGIC:
        raise SnapshotError(f"magic {magic!r}, expected {FILE_MAGIC!r}")
    if fmt != FORMAT_VERSION:
        raise SnapshotError(f"format {fmt}; this server reads format {FORMAT_VERSION}")
    end = _PREFIX.size + header_len
    if header_len > MAX_JSON or end + _U32.size > len(data):
        raise SnapshotError("header runs past the end of the file")
    if zlib.crc32(data[:end]) != _U32.unpack_from(data, end)[0]:
        raise SnapshotError("header checksum mismatch")
    try:
        if not isinstance(json.loads(data[_PREFIX.size : end]), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise SnapshotError(f"header is malformed: {e!r}") from e
    pos = end + _U32.size
    blobs: list[bytes] = []
    while True:
        if pos + _U32.size > len(data):
            raise SnapshotError(f"truncated after session {len(blobs)}")
        (n,) = _U32.unpack_from(data, pos)
        pos += _U32.size
        if n == 0:  # the end
            break
        if pos + n > len(data):
            raise SnapshotError(f"truncated inside session {len(blobs) + 1}")
        blobs.append(data[pos : pos + n])
        pos += n
    if data[pos:] != END_MAGIC + _U32.pack(len(blobs)):
        raise SnapshotError("missing or bad end marker (truncated or trailing bytes)")
    return blobs


# --- between the engine and the file ----------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_names(mv: ModelVersion) -> list[str]:
    return [s.input for s in mv.runtime.manifest.states]


def _record(s: Session, states: dict[str, np.ndarray], now: float) -> SessionRecord:
    mv = s.mv
    return SessionRecord(
        id=s.id,
        model=mv.name,
        version=mv.version,
        onnx_sha256=mv.runtime.manifest.onnx.sha256,
        last_seq=s.last_seq,
        steps=s.steps,
        states=states,
        forecast=s.forecast,
        quantile_forecast=s.quantile_forecast,
        last_digest=s.last_digest.hex() if s.last_digest else None,
        idle_s=max(0.0, now - s.last_used),
        owner=s.owner,
    )


class Snapshotter:
    """Writes the session table in chunks of CAPTURE_CHUNK sessions: each chunk is read on the event loop
    (each session in one synchronous block, so its state and sequence number agree), then encoded and
    written in a thread while the loop serves, so neither the loop nor memory grows with the session count.
    Restores it at start. One write at a time; the final one waits for a periodic one in flight."""

    def __init__(self, path: Path, sessions: SessionTable, repo: Repository) -> None:
        self.path = path
        self.sessions = sessions
        self.repo = repo
        self._index: dict[str, tuple[int, int]] = {}  # session id -> (offset, length) in the file at `path`
        self._writing: asyncio.Future[int] | None = None
        self.last_written = 0  # sessions in the last snapshot

    @staticmethod
    def _capture_chunk(chunk: list[Session], records: list[SessionRecord], busy: list[str]) -> None:
        now = time.monotonic()
        by_mv: dict[int, tuple[ModelVersion, list[Session]]] = {}
        for s in chunk:
            if s.closed:  # closed since the list was taken
                continue
            if s.busy:
                busy.append(s.id)
            else:
                by_mv.setdefault(id(s.mv), (s.mv, []))[1].append(s)
        for mv, group in by_mv.values():
            arrays = mv.pool.gather(np.array([s.slot for s in group], dtype=np.int64))  # one indexed read: copies
            names = _state_names(mv)
            for k, s in enumerate(group):
                records.append(_record(s, {n: a[:, k, :] for n, a in zip(names, arrays, strict=True)}, now))

    def _write_chunk(self, writer: SnapshotWriter, records: list[SessionRecord], busy: list[str]) -> None:
        """Worker thread: encodes the records; a busy session's blob is carried over from the last snapshot."""
        for r in records:
            writer.add(encode_session(r), r.id)
        carried = [sid for sid in busy if sid in self._index]
        if not carried:
            return
        try:
            with self.path.open("rb") as f:
                for sid in carried:
                    offset, length = self._index[sid]
                    f.seek(offset)
                    writer.add(f.read(length), sid)
        except OSError as e:
            log.warning("snapshot: cannot carry %d busy session(s) over from %s: %s", len(carried), self.path, e)

    async def save(self) -> int:
        """Writes a snapshot of every session; returns how many sessions it holds. A caller that is cancelled
        does not cut the write short: the next save waits for it."""
        while self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)
        self._writing = asyncio.ensure_future(self._save())
        return await asyncio.shield(self._writing)

    async def _save(self) -> int:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        codes, ids = self.sessions.live()  # values: handles are made a chunk at a time
        writer = await loop.run_in_executor(None, SnapshotWriter, self.path)
        try:
            for start in range(0, len(codes), CAPTURE_CHUNK):
                records: list[SessionRecord] = []
                busy: list[str] = []
                end = start + CAPTURE_CHUNK
                chunk = self.sessions.handles(codes[start:end], ids[start:end])  # those still live
                self._capture_chunk(chunk, records, busy)  # on the loop
                await loop.run_in_executor(None, self._write_chunk, writer, records, busy)
            self._index = await loop.run_in_executor(None, writer.commit)
        except BaseException:
            writer.abort()
            raise
        self.last_written = len(self._index)
        log.debug("snapshot: %d session(s) to %s in %.3f s", self.last_written, self.path, time.monotonic() - t0)
        return self.last_written

    def read(self) -> list[SessionRecord]:
        """The sessions of the snapshot on disk (none when there is no file); SnapshotError when corrupt.
        Called before the models load, so a corrupt file is refused at once."""
        self._remove_stale_temporaries()
        if not self.path.exists():
            log.info("no session snapshot at %s; starting without sessions", self.path)
            return []
        return read_file(self.path)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writers that died mid-write (kill -9): their pid is no longer running."""
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*-*"):
            try:
                pid = int(tmp.name.rsplit("-", 2)[-2])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                tmp.unlink(missing_ok=True)
                log.info("removed %s, left by a snapshot write that was cut short", tmp)

    def restore(self, records: list[SessionRecord]) -> int:
        """Puts read sessions into the session table; returns how many came back. A session whose model
        version is not loaded (or has another graph now) is dropped with a warning."""
        restored = 0
        for r in records:
            try:
                restore_session(self.sessions, self.repo, r)
                restored += 1
            except (SnapshotError, NotFound, ValueError) as e:
                log.warning("snapshot: session %s not restored: %s", r.id, e)
            except Exception as e:  # the pool is full, ...
                log.warning("snapshot: session %s not restored: %s", r.id, getattr(e, "message", e))
        if records:
            log.info("restored %d of %d session(s) from %s", restored, len(records), self.path)
        if restored < len(records):  # the next write drops them: keep the file they are in
            keep = self.path.with_name(f"{self.path.name}.{int(time.time())}.unrestored")
            shutil.copyfile(self.path, keep)
            log.warning(
                "%d session(s) not restored; the snapshot holding them is kept as %s", len(records) - restored, keep
            )
        return restored


def export_session(sessions: SessionTable, session_id: str) -> bytes:
    """One session alone as a blob (for moving it to another server). The session must have no step in
    flight."""
    s = sessions.get(session_id)
    if s.busy:
        raise ValueError(f"session {session_id} has a step in flight")
    arrays = s.mv.pool.gather(np.array([s.slot], dtype=np.int64))
    states = {n: a[:, 0, :] for n, a in zip(_state_names(s.mv), arrays, strict=True)}
    return encode_session(_record(s, states, time.monotonic()))


def restore_session(sessions: SessionTable, repo: Repository, r: SessionRecord) -> None:
    """Re-creates a session from its record on the exact model version and graph it was written from."""
    mv = repo.resolve(r.model, r.version)
    m = mv.runtime.manifest
    if m.onnx.sha256 != r.onnx_sha256:
        raise SnapshotError(f"{r.model} v{r.version} now has another graph (sha256 {m.onnx.sha256[:12]}...)")
    states = []
    for spec in m.states:
        a = r.states.get(spec.input)
        if a is None or a.shape != tuple(spec.dims):
            got = None if a is None else list(a.shape)
            raise SnapshotError(f"state {spec.input}: {got}, the model wants {list(spec.dims)}")
        states.append(a)
    if set(r.states) != {spec.input for spec in m.states}:
        raise SnapshotError(f"states {sorted(r.states)} do not match the model's")
    # everything read before the session is put in the table: one that is refused must not be live either
    # (found by a hostile test: a negative last_seq or a digest that is not hex was reported "not restored"
    # while the session served, accepting sequence 1 on a state that was 6 steps in)
    for name, value in (("last_seq", r.last_seq), ("steps", r.steps)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise SnapshotError(f"{name} {value!r} is not a count from 0 to 2**64 - 1")
    try:
        digest = bytes.fromhex(r.last_digest) if r.last_digest else b""
    except (TypeError, ValueError):
        raise SnapshotError(f"last_digest {str(r.last_digest)[:40]!r} is not hex") from None
    session = sessions.restore(mv, r.id, states, r.owner)
    try:
        session.last_seq = r.last_seq
        session.steps = r.steps
        session.forecast = r.forecast
        session.quantile_forecast = r.quantile_forecast
        # a 16-byte digest (blobs written before digests were 8 bytes) cannot be compared with today's: none is
        # kept, so a retry of last_seq is answered from the stored forecast whatever rows it resends
        session.last_digest = digest if len(digest) == DIGEST_BYTES else b""
    except Exception as e:
        sessions.discard(session)
        raise SnapshotError(f"session {r.id}: {e}") from e
