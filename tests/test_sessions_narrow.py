"""Issue 9, narrow bookkeeping: 8-byte rows digests (small steps kept exactly, vectorised), a saturating
`steps`, at most MAX_OWNERS identities numbered at a time, float32 `last_used` relative to the table's
epoch, a uint32 index while entries fit (int64 otherwise), version numbers reused, free slots handed out
lowest first, and older 16-byte digests read as none kept."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gatecast.manifest import StateSpec
from gatecast.service import sessions as sessions_module
from gatecast.service.batcher import Output
from gatecast.service.errors import FailedPrecondition, ResourceExhausted
from gatecast.service.metrics import Metrics
from gatecast.service.pool import USED, StatePool
from gatecast.service.repository import ModelVersion
from gatecast.service.sessions import (
    STEPS_MAX,
    SessionTable,
    rows_digest,
    rows_digests,
    rows_digests_list,
)
from gatecast.service.snapshot import SessionRecord, decode_session, encode_session, restore_session

SPECS = [StateSpec(input="h0", output="hn", dims=(2, 4)), StateSpec(input="c0", output="cn", dims=(2, 4))]
HORIZON = 3


def version(initial: int = 16, cap: int = 100_000, name: str = "m") -> ModelVersion:
    manifest = SimpleNamespace(name=name, version=1, onnx=SimpleNamespace(sha256="f" * 64), states=SPECS)
    return ModelVersion(SimpleNamespace(manifest=manifest), StatePool(SPECS, initial, cap), None)  # type: ignore[arg-type]


def table(**kw: object) -> SessionTable:
    return SessionTable(Metrics(CollectorRegistry()), idle_s=60.0, **kw)  # type: ignore[arg-type]


def answer(k: float) -> Output:
    return Output(np.full((HORIZON, 1), k, np.float32))


def test_rows_digests_are_8_bytes_each_and_agree_with_rows_digest() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 1, 1), (3, 0, 1), (4, 1, 2), (6, 1, 3), (2, 7, 5), (1, 1, 1)]:
        x = rng.standard_normal(shape).astype(np.float32)
        joined = rows_digests(x)
        one_by_one = [rows_digest(x[k]) for k in range(shape[0])]
        assert isinstance(joined, bytes) and len(joined) == 8 * shape[0], shape
        assert joined == b"".join(one_by_one), shape
        assert rows_digests_list(x) == one_by_one
        assert all(d != bytes(8) for d in one_by_one)  # all zero means "none kept"
    assert rows_digests(np.zeros((0, 1, 1), np.float32)) == b""
    # a step of one value is kept exactly: its length + 1, its bytes, zero padding
    assert rows_digest(np.array([[1.5]], np.float32)) == b"\x05" + np.float32(1.5).tobytes() + bytes(3)
    assert rows_digest(np.array([[0.0]], np.float32)) != rows_digest(np.array([[-0.0]], np.float32))
    assert rows_digest(np.zeros((0, 1), np.float32)) != rows_digest(np.zeros((1, 1), np.float32))
    # a float64 step is digested as the float32 it is run as
    assert rows_digests(np.array([[[2.0]], [[3.0]]])) == rows_digests(np.array([[[2.0]], [[3.0]]], np.float32))
    x = rng.standard_normal((1, 4, 2)).astype(np.float32)  # 32 bytes: hashed, one bit changes it
    y = x.copy()
    y[0, 3, 1] = np.nextafter(y[0, 3, 1], np.float32(np.inf))
    assert rows_digests(x) != rows_digests(y) and rows_digest(x[0]) == rows_digests(x)


def test_a_retry_is_told_apart_by_its_8_byte_digest_singly_and_in_blocks() -> None:
    t, mv = table(), version()
    a, b = t.open(mv), t.open(mv)
    xa = np.array([[0.25]], np.float32)
    a.hold()
    a.committer(1, 1, rows_digest(xa))(answer(7.0))
    a.release()
    assert a.last_digest == rows_digest(xa) and len(a.last_digest) == 8
    assert a.check_sequence(1, rows_digest(xa)) is True  # the retry: answered from the stored forecast
    with pytest.raises(FailedPrecondition, match="different rows"):
        a.check_sequence(1, rows_digest(np.array([[0.5]], np.float32)))
    assert a.check_sequence(2, rows_digest(xa)) is False
    x = np.array([[[1.0]], [[2.0]]], np.float32)
    slots = np.array([a.slot, b.slot])
    ok = t.claim(mv, slots, np.array([2, 1], np.uint64), None)
    assert ok.tolist() == [True, True] and a.busy and b.busy
    y = np.stack([np.full((HORIZON, 1), 1.0, np.float32), np.full((HORIZON, 1), 2.0, np.float32)])
    t.commit_block(mv, slots, [2, 1], 1, rows_digests(x), Output(y))
    t.release_block(mv, slots)
    assert not a.busy and not b.busy
    assert (a.last_digest, b.last_digest) == (rows_digest(x[0]), rows_digest(x[1]))
    assert (a.last_seq, a.steps, b.last_seq, b.steps) == (2, 2, 1, 1)
    assert a.forecast is not None and a.forecast.tobytes() == y[0].tobytes()
    with pytest.raises(FailedPrecondition, match="different rows"):
        b.check_sequence(1, rows_digest(x[0]))
    with pytest.raises(ValueError, match="8 bytes"):
        a.last_digest = bytes(16)


def test_steps_saturate_at_the_columns_limit() -> None:
    t, mv = table(), version()
    s = t.open(mv)
    s.steps = 2**40
    assert s.steps == STEPS_MAX
    s.steps = STEPS_MAX - 1
    slots = np.array([s.slot])
    t.claim(mv, slots, np.array([1], np.uint64), None)
    t.commit_block(mv, slots, [1], 5, rows_digests(np.zeros((1, 5, 1), np.float32)), Output(np.zeros((1, HORIZON, 1))))
    t.release_block(mv, slots)
    assert s.steps == STEPS_MAX
    s.hold()
    s.committer(2, 3, b"")(answer(0.0))
    s.release()
    assert s.steps == STEPS_MAX and s.last_seq == 2


def test_identities_beyond_the_owner_column_are_refused_and_numbers_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions_module, "MAX_OWNERS", 3)
    t, mv = table(), version()
    first = {name: t.open(mv, name) for name in ("a", "b", "c")}
    with pytest.raises(ResourceExhausted, match="3 client identities"):
        t.open(mv, "d")
    assert mv.pool.used == 3 and len(t) == 3  # the slot taken for "d" went back
    t.open(mv, "c")  # a numbered identity may open more
    t.discard(first["a"])
    d = t.open(mv, "d")  # "a"'s number is free again
    assert d.owner == "d" and t._owner_numbers["d"] == 1
    assert t.get(first["b"].id, "b").owner == "b" and t.get(d.id, "d").id == d.id


def test_last_used_reads_as_monotonic_seconds() -> None:
    t, mv = table(), version()
    s = t.open(mv)
    assert abs(s.last_used - time.monotonic()) < 1.0
    s.last_used = time.monotonic() - 120.0
    assert abs(s.last_used - (time.monotonic() - 120.0)) < 0.01
    assert mv.pool.columns["last_used"].dtype == np.float32
    assert t.expire() == 1 and len(t) == 0


def test_the_index_packs_uint32_entries_and_widens_when_a_version_needs_it() -> None:
    t, small = table(), version(cap=1000)
    ids = [t.open(small).id for _ in range(300)]
    assert t._index.dtype == np.uint32
    codes = t.locate_many(ids)
    assert all(c >> 32 == 1 for c in codes)
    big = version(cap=2**31, name="big")  # slots need 31 bits: number and slot no longer fit 32
    more = [t.open(big).id for _ in range(300)]
    assert t._index.dtype == np.int64
    assert t.locate_many(ids) == codes  # codes do not depend on the packing
    assert all(t.get(sid).model == "big" for sid in more)
    words = np.frombuffer(bytes.fromhex("".join(ids + more + ["ab" * 16])), "<u8").reshape(-1, 2)
    found = t.locate_words(words)
    assert found.dtype == np.int64 and found.tolist() == [t.locate(s) for s in ids + more] + [-1]


def test_a_version_number_is_reused_once_its_sessions_are_gone() -> None:
    t, a, b = table(), version(name="a"), version(name="b")
    sa, sb = t.open(a), t.open(b)
    assert (sa.code >> 32, sb.code >> 32) == (1, 2)
    t.discard(sa)
    c = version(name="c")
    sc = t.open(c)
    assert sc.code >> 32 == 1 and t.get(sb.id).model == "b" and t.get(sc.id).model == "c"
    assert t.locate(sa.id) == -1 and sa.closed  # the old handle does not reach the new version's slot


def test_free_slots_go_out_lowest_first_and_the_pool_gives_memory_back() -> None:
    pool = StatePool(SPECS, initial=4, cap=64)
    slots = [pool.acquire() for _ in range(40)]
    assert slots == list(range(40)) and pool.capacity == 64
    pool.release(np.array([s for s in slots if s not in (5, 30)]))
    assert pool.capacity == 32 and pool.used == 2  # shrunk as far as slot 30 allows
    flags = pool.columns["flags"]
    assert np.flatnonzero(flags & USED).tolist() == [5, 30]
    again = [pool.acquire() for _ in range(30)]
    assert again == [*range(5), *range(6, 30), 31]
    assert [pool.acquire() for _ in range(32)] == list(range(32, 64))  # grown back to the cap
    assert pool.capacity == 64 and pool.used == 64
    with pytest.raises(ResourceExhausted):
        pool.acquire()


def test_an_older_16_byte_digest_is_restored_as_none_kept() -> None:
    t, mv = table(), version()
    repo = SimpleNamespace(resolve=lambda name, v: mv)
    states = {s.input: np.ones(s.dims, np.float32) for s in SPECS}

    def record(sid: str, digest: str) -> SessionRecord:
        r = SessionRecord(sid, "m", 1, "f" * 64, 4, 4, states, forecast=np.ones((HORIZON, 1), np.float32))
        r.last_digest = digest
        return decode_session(encode_session(r))

    old = record("ab" * 16, "00" * 16)  # written by a server of 16-byte digests
    restore_session(t, repo, old)  # type: ignore[arg-type]
    s = t.get(old.id)
    assert s.last_digest == b"" and s.last_seq == 4
    assert s.check_sequence(4, rows_digest(np.array([[9.0]], np.float32))) is True  # answered from the forecast
    kept = rows_digest(np.array([[1.0]], np.float32))
    new = record("cd" * 16, kept.hex())
    restore_session(t, repo, new)  # type: ignore[arg-type]
    s2 = t.get(new.id)
    assert s2.last_digest == kept
    with pytest.raises(FailedPrecondition, match="different rows"):
        s2.check_sequence(4, rows_digest(np.array([[9.0]], np.float32)))


def test_a_sequence_past_the_4_byte_column_is_kept_exactly_and_goes_the_single_step_way() -> None:
    t, mv = table(), version()
    s, other = t.open(mv), t.open(mv)
    s.last_seq = 2**32 - 2
    slots = np.array([s.slot])
    assert t.claim(mv, slots, np.array([2**32 - 1], np.uint64), None).tolist() == [True]
    t.commit_block(
        mv, slots, [2**32 - 1], 1, rows_digests(np.zeros((1, 1, 1), np.float32)), Output(answer(1.0).y[None])
    )
    t.release_block(mv, slots)
    assert s.last_seq == 2**32 - 1 and t.big_seqs == {}
    assert t.claim(mv, slots, np.array([2**32], np.uint64), None).tolist() == [False]  # not in a block
    assert not s.busy
    assert s.check_sequence(2**32) is False
    s.hold()
    s.committer(2**32, 1, rows_digest(np.ones((1, 1), np.float32)))(answer(2.0))
    s.release()
    assert s.last_seq == 2**32 and t.big_seqs == {s.code: 2**32}
    assert s.check_sequence(2**32, rows_digest(np.ones((1, 1), np.float32))) is True
    assert s.check_sequence(2**32 + 1) is False
    with pytest.raises(FailedPrecondition, match=f"expected {2**32 + 1}"):
        s.check_sequence(2**32 + 2)
    assert t.claim(mv, slots, np.array([2**32 + 1], np.uint64), None).tolist() == [False]
    s.last_seq = 2**64 - 1
    assert s.last_seq == 2**64 - 1
    assert other.last_seq == 0 and t.claim(mv, np.array([other.slot]), np.array([1], np.uint64), None).tolist() == [
        True
    ]
    t.release_block(mv, np.array([other.slot]))
    slot = s.slot
    t.discard(s)
    assert t.big_seqs == {}  # gone with its session: the slot's next session starts from its column
    again = t.open(mv)
    assert again.slot == slot and again.last_seq == 0
    again.last_seq = 2**32 - 1
    assert again.last_seq == 2**32 - 1


def test_the_heap_is_tuned_and_trimmed_on_glibc() -> None:
    import platform

    from gatecast.service.pool import trim_heap, tune_heap

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_heap() is glibc and tune_heap() is glibc  # once; a second call changes nothing
    trim_heap()  # nothing to check but that it runs (a no-op elsewhere)
