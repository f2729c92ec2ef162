"""The batch RPCs' common message read and answered at the wire level (issue 9).

A gateway's ObserveBatch/StreamBatch message is nearly always the same record repeated: one step per
session, a 32-character id, a sequence of the same width, one row of the model's features. `Uniform.parse`
recognises exactly that layout from the bytes (every byte outside the id, the sequence and the values
equal to the first record's, and the first record checked field by field), and reads the ids, sequences
and values of all records at once with numpy instead of one protobuf wrapper per field. Any other message
(another field order, a step of several rows, a malformed id, unknown fields, anything) is not `Uniform`
and is decoded by protobuf as before: the fast reading only ever accepts bytes that protobuf would decode
to the same values.

`answers` writes the StreamResponses of many steps of one model in one array: the records differ only in
their id, sequence and values, so the answer is a template row with those columns filled in.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from gatecast.v1 import forecaster_pb2 as pb

from .convert import _head, _varint

_HEX = np.full(256, 255, np.uint8)  # an id character's value, 255 for anything but lowercase hex
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_ID = slice(4, 36)  # a record's id characters: 0x0a len | 0x0a 0x20 <32 characters> | 0x10 <sequence> ...
_SEQ_AT = 37
MAX_SEQ_BYTES = 9  # a longer varint (a sequence of 2**63 or more) is read by protobuf
_SEQ_WEIGHTS = np.uint64(1) << np.arange(0, 7 * MAX_SEQ_BYTES, 7, dtype=np.uint64)  # a varint byte's place


def _varint_len(data: bytes, at: int) -> int:
    """The length of the varint starting at `at` (0 when it runs past the end or past MAX_SEQ_BYTES)."""
    for k in range(MAX_SEQ_BYTES):
        if at + k >= len(data):
            return 0
        if not data[at + k] & 0x80:
            return k + 1
    return 0


class Layout(NamedTuple):
    """Where a record's variable parts sit."""

    stride: int
    seq: slice
    values: slice
    cols: int
    # the bits every record must share with the first: all of the fixed bytes, and each sequence byte's
    # continuation bit (so every sequence is a varint exactly this wide); none of the id's or values'
    same: np.ndarray


@lru_cache(maxsize=256)
def _layout(stride: int, k: int, cols: int) -> Layout:
    seq = slice(_SEQ_AT, _SEQ_AT + k)
    values = slice(stride - 4 * cols, stride)
    same = np.full(stride, 0xFF, np.uint8)
    same[_ID] = 0
    same[seq] = 0x80
    same[values] = 0
    return Layout(stride, seq, values, cols, same)


FIXED_RECORDS = 1024  # records a cached template covers; a longer message is checked record by record
FIXED_LAYOUTS = 16  # templates kept (one per layout a client uses; a client cycling layouts clears them)
_FIXED: dict[tuple[int, int, int], tuple[np.ndarray, bytes]] = {}  # see _fixed_bytes


def _fixed_bytes(layout: Layout, first: np.ndarray) -> tuple[np.ndarray, bytes]:
    """`layout.same` for FIXED_RECORDS records, and what it selects of the first record, repeated: a message
    of n records is uniform when its bytes under the mask's first n records equal the first n records of
    the other. All that `same` selects in a record `_first_record` accepted follows from the layout (tags,
    lengths, the feature count, which sequence bytes continue), so the pair is kept by layout (`first`,
    checked, is read only to build it). At most FIXED_LAYOUTS pairs of at most 2 x 1024 x 129 bytes."""
    key = (layout.stride, layout.seq.stop, layout.cols)
    pair = _FIXED.get(key)
    if pair is None:
        if len(_FIXED) >= FIXED_LAYOUTS:
            _FIXED.clear()
        pair = _FIXED[key] = (
            np.tile(layout.same, FIXED_RECORDS),
            np.tile(first & layout.same, FIXED_RECORDS).tobytes(),
        )
    return pair


def _first_record(data: bytes) -> Layout | None:
    """The layout of the first record when it is exactly: results tag, one-byte length, session_id (32
    characters), sequence, rows = a Matrix of one row with cols (1 to 31) and packed values, nothing else."""
    if len(data) < 2 or data[0] != 0x0A or data[1] & 0x80:
        return None
    stride = 2 + data[1]
    if stride <= _SEQ_AT or len(data) < stride:  # too short for an id and a sequence (an empty step: b"\n\0")
        return None
    if data[2] != 0x0A or data[3] != 0x20 or data[36] != 0x10:
        return None
    k = _varint_len(data, _SEQ_AT)
    at = _SEQ_AT + k
    if k == 0 or at + 8 > stride or data[at] != 0x1A:
        return None
    m = data[at + 1]  # the Matrix's length (one byte)
    cols = data[at + 5]
    if m & 0x80 or at + 2 + m != stride or not 0 < 4 * cols < 0x80:  # the values' length in one byte too
        return None
    if data[at + 2 : at + 8] != bytes((0x08, 0x01, 0x10, cols, 0x1A, 4 * cols)) or m != 6 + 4 * cols:
        return None
    return _layout(stride, k, cols)


class Known:
    """What a stream's previous uniform message named: its ids (as characters and as words), where those
    sessions were, and what the servicer worked out from that. A gateway names the same sessions message
    after message; their ids are then not decoded again, and their codes are not looked up again: they are
    reused while no session has been removed from the table since (`removed`), else checked
    (`SessionTable.still_live`)."""

    __slots__ = ("codes", "ids", "plan", "removed", "words")

    def __init__(self) -> None:
        self.ids = b""
        self.words: np.ndarray | None = None
        self.codes: np.ndarray | None = None
        self.removed = -1  # the table's `removed` when every code was found live; -1: check them
        self.plan: Any = None  # the servicer's, for these codes (see ForecasterServicer._begin_uniform)

    def forget(self) -> None:
        self.codes, self.plan, self.removed = None, None, -1


class Uniform(NamedTuple):
    """Every step of a uniform batch message, as arrays."""

    records: np.ndarray  # [n, stride] uint8, the records themselves (ids and sequences are copied from them)
    layout: Layout
    words: np.ndarray  # [n, 2] uint64: each id's 16 bytes as the session table keeps them
    seqs: np.ndarray  # [n] uint64
    x: np.ndarray  # [n, 1, cols] float32

    @staticmethod
    def parse(data: bytes, known: Known | None = None) -> Uniform | None:
        layout = _first_record(data)
        if layout is None or len(data) % layout.stride:
            return None
        flat = np.frombuffer(data, np.uint8)
        records = flat.reshape(-1, layout.stride)
        if len(records) <= FIXED_RECORDS:  # one masked compare of the whole message, as bytes
            mask, fixed = _fixed_bytes(layout, records[0])
            if (flat & mask[: len(flat)]).tobytes() != fixed[: len(flat)]:
                return None  # a record unlike the first (whose every byte `_first_record` checked)
        elif ((records ^ records[0]) & layout.same).any():
            return None
        chars = np.ascontiguousarray(records[:, _ID])
        if known is not None and known.words is not None and chars.tobytes() == known.ids:
            words = known.words  # the same ids as the stream's previous message
        else:
            digits = _HEX[chars]
            if (digits == 255).any():
                return None  # not a well-formed id: protobuf's way answers that step with its error
            words = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2]).view("<u8")
            if known is not None:
                known.ids, known.words = chars.tobytes(), words
                known.forget()
        seq = records[:, layout.seq]
        if seq.shape[1] > 1 and np.count_nonzero(seq[:, -1]) < len(records):
            return None  # a sequence written longer than it needs: the answer would not be protobuf's bytes
        if seq.shape[1] == 1:
            seqs = seq[:, 0].astype(np.uint64)
        else:  # each byte's 7 bits at their place: one product for all records (a loop over bytes took 3x)
            seqs = (seq & 0x7F).astype(np.uint64) @ _SEQ_WEIGHTS[: seq.shape[1]]
        x = np.ascontiguousarray(records[:, layout.values]).view("<f4").astype(np.float32, copy=False)
        return Uniform(records, layout, words, seqs, x.reshape(len(records), 1, layout.cols))


class BatchWire:
    """An ObserveBatchRequest as received: its bytes, read as `Uniform` or decoded by protobuf on demand
    (the batch RPCs' request deserializer, which never raises)."""

    __slots__ = ("_message", "_read", "_uniform", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._message: pb.ObserveBatchRequest | None = None
        self._read = False
        self._uniform: Uniform | None = None

    def uniform(self, known: Known | None = None) -> Uniform | None:
        """The message as a `Uniform`, or None (read once)."""
        if not self._read:
            self._uniform, self._read = Uniform.parse(self.data, known), True
        return self._uniform

    def message(self) -> pb.ObserveBatchRequest:
        """The protobuf message; raises what protobuf raises for bytes that are not one."""
        if self._message is None:
            self._message = pb.ObserveBatchRequest.FromString(self.data)
        return self._message


def matrix_field(tag: int, rows: int, cols: int) -> bytes:
    """A Matrix field up to its values (tag, length, rows, cols, the packed values' tag and length)."""
    head = _head(rows, cols, rows * cols)
    return bytes((tag,)) + _varint(len(head) + 4 * rows * cols) + head


@lru_cache(maxsize=256)
def _answer_template(k: int, y_shape: tuple[int, int], q_shape: tuple[int, int] | None) -> tuple[bytes, int, int, int]:
    """An answer record (results tag and length, then a StreamResponse) with zeroed variable parts; where
    the StreamResponse begins, and where the forecast's and the quantile forecast's values begin."""
    body = b"\x0a\x20" + bytes(32) + b"\x10" + bytes(k) + matrix_field(0x1A, *y_shape)
    y_at = len(body)
    body += bytes(4 * y_shape[0] * y_shape[1])
    q_at = 0
    if q_shape is not None:
        body += matrix_field(0x2A, *q_shape)
        q_at = len(body)
        body += bytes(4 * q_shape[0] * q_shape[1])
    prefix = b"\x0a" + _varint(len(body))
    p = len(prefix)
    return prefix + body, p, p + y_at, p + q_at if q_shape is not None else 0


def answers(u: Uniform, members: np.ndarray | None, y: np.ndarray, q: np.ndarray | None) -> tuple[bytes, int]:
    """The answers of steps `members` of `u` (None: every step; their forecasts y [m, horizon, targets], quantile
    forecasts q [m, horizon, targets, quantiles] or None) as consecutive ObserveBatchResponse.results
    records, each with its step's id and sequence copied from the request; returns the bytes and the
    length of one record."""
    m = len(y)
    k = u.layout.seq.stop - u.layout.seq.start
    q_shape = None if q is None else (int(q.shape[1]), int(q.shape[2] * q.shape[3]))
    template, at, y_at, q_at = _answer_template(k, (int(y.shape[1]), int(y.shape[2])), q_shape)
    out = np.empty((m, len(template)), np.uint8)
    out[:] = np.frombuffer(template, np.uint8)
    src = u.records if members is None else u.records[members]
    out[:, at + 2 : at + 34] = src[:, _ID]
    out[:, at + 35 : at + 35 + k] = src[:, u.layout.seq]
    yf = np.ascontiguousarray(y, "<f4").reshape(m, -1).view(np.uint8)
    out[:, y_at : y_at + yf.shape[1]] = yf
    if q is not None:
        qf = np.ascontiguousarray(q, "<f4").reshape(m, -1).view(np.uint8)
        out[:, q_at : q_at + qf.shape[1]] = qf
    return out.tobytes(), len(template)


# --- one-row Stream messages ---------------------------------------------------------------------------

_LOWER_HEX = b"0123456789abcdef"


def read_step(data: bytes) -> tuple[int, int, int] | None:
    """The common Stream message, recognised from its bytes: session_id (32 characters), sequence (1 or
    more, a varint of at most MAX_SEQ_BYTES bytes written no longer than it needs), rows = a Matrix of one
    row with cols 1 to 30 and packed finite values, in that order and nothing else: (sequence, cols, head),
    where data[:head] is the session_id and sequence fields (an answer's first fields are the same bytes)
    and the row's values are the last 4 * cols bytes. Anything else (another field order, several rows,
    unknown fields, NaN, sequence 0, ...) is None and is decoded by protobuf. The id's characters are
    data[2:34], read by `session_key`: whatever both accept, protobuf decodes to the same values."""
    n = len(data)
    if n < 48 or data[0] != 0x0A or data[1] != 0x20 or data[34] != 0x10:
        return None
    b = data[35]
    if b < 0x80:  # a one-byte sequence: the common case
        seq, at = b, 36
    else:
        seq, shift, at = b & 0x7F, 7, 36
        while True:
            if at - 35 >= MAX_SEQ_BYTES or at >= n:
                return None
            b = data[at]
            seq |= (b & 0x7F) << shift
            at += 1
            if b < 0x80:
                break
            shift += 7
        if b == 0:  # written longer than it needs: the answer would not be protobuf's bytes
            return None
    if seq == 0 or at + 8 > n or data[at] != 0x1A:
        return None
    cols = data[at + 5]
    size = 4 * cols
    if data[at + 1] != 6 + size or at + 8 + size != n or not 0 < size < 0x80 - 6:  # one-byte lengths
        return None
    if data[at + 2 : at + 8] != bytes((0x08, 0x01, 0x10, cols, 0x1A, size)):
        return None
    for j in range(at + 10, n, 4):  # NaN or infinity: every exponent bit set
        if data[j + 1] & 0x7F == 0x7F and data[j] & 0x80:
            return None
    return seq, cols, at


def session_key(chars: bytes) -> bytes | None:
    """The 16 bytes of a session id written as 32 lowercase hex characters (as handed out), else None."""
    if len(chars) != 32 or chars.translate(None, _LOWER_HEX):
        return None
    return bytes.fromhex(chars.decode())
