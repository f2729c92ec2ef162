"""The session store (issue 12): real servers sharing a real redis-server on loopback, a real gRPC client.
A session moves between replicas with exact answers, a cut-off replica is fenced, and an outage of Redis
fails no step."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from benchmarks.load import start_server
from benchmarks.session_store import RedisServer
from gatecast.service.auth import token_name
from gatecast.service.server import create_server
from gatecast.service.settings import SettingsError
from gatecast.service.snapshot import decode_session, encode_session
from gatecast.service.store import _WRITE, KEY
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, RunningServer, array, matrix, server_settings, taylor_values

VALUES = taylor_values()
HISTORY = VALUES[:480]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store_repo")
    shutil.copytree(DEFAULT_MODEL, path / "taylor")
    return path


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture()
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def replica(repo: Path, url: str, **kw: object) -> RunningServer:
    return RunningServer(server_settings(repo, session_store_url=url, **kw))


def row(seq: int) -> pb.Matrix:
    return matrix(VALUES[480 + seq : 481 + seq])


def observe(stub: pb_grpc.ForecasterStub, sid: str, seq: int, **kw: object) -> np.ndarray:
    return array(stub.Observe(pb.ObserveRequest(session_id=sid, sequence=seq, rows=row(seq)), **kw).forecast)


def opened(stub: pb_grpc.ForecasterStub, **kw: object) -> str:
    return str(stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=matrix(HISTORY)), **kw).session_id)


def stored(db: redis.Redis, sid: str) -> dict[bytes, bytes]:
    return db.hgetall(KEY + sid)  # type: ignore[return-value]


def metric(srv: RunningServer, name: str, **labels: str) -> float:
    value = srv.app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_step_is_written_and_close_leaves_a_tombstone(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    srv = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = opened(stub)
            assert decode_session(stored(db, sid)[b"blob"]).last_seq == 0  # there before the client has the id
            answers = [observe(stub, sid, seq) for seq in (1, 2, 3)]
            h = stored(db, sid)
            r = decode_session(h[b"blob"])
            assert int(h[b"seq"]) == r.last_seq == 3 and r.steps == 480 + 3 and r.owner is None
            assert r.forecast is not None and np.array_equal(r.forecast, answers[-1])  # the answer that left
            assert 0 < db.pttl(KEY + sid) <= 600_000  # session_store_ttl_s defaults to session_idle_s
            assert metric(srv, "gatecast_session_store_writes_total", outcome="written") == 4
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            assert stored(db, sid) == {b"closed": b"1"}
            with pytest.raises(grpc.RpcError) as e:  # closed: not taken over again from the store
                observe(stub, sid, 4)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_a_replica_takes_over_a_session_of_a_killed_one_with_exact_answers(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    """Replica A (a `gatecast serve` process) is killed with SIGKILL after step 5; B answers the resent step
    5 from the store and steps 6-10 bit for bit as an uninterrupted session does."""
    proc, port = start_server(repo, {"GATECAST_SESSION_STORE_URL": redis_server.url})
    b = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch_a, grpc.insecure_channel(b.address) as ch_b:
            stub_a, stub_b = pb_grpc.ForecasterStub(ch_a), pb_grpc.ForecasterStub(ch_b)
            sid = opened(stub_a)
            from_a = [observe(stub_a, sid, seq) for seq in range(1, 6)]
            proc.kill()
            proc.wait(timeout=10)
            again = observe(stub_b, sid, 5)  # its answer was lost with A: resent, answered from the store
            moved = [observe(stub_b, sid, seq) for seq in range(6, 11)]
            ref = opened(stub_b)
            reference = [observe(stub_b, ref, seq) for seq in range(1, 11)]
        assert all(np.array_equal(x, y) for x, y in zip(from_a, reference[:5], strict=True))
        assert np.array_equal(again, from_a[4])
        assert all(np.array_equal(x, y) for x, y in zip(moved, reference[5:], strict=True))
        assert metric(b, "gatecast_sessions_resumed_total", model="taylor", version="1") == 1
        assert decode_session(stored(db, sid)[b"blob"]).last_seq == 10
    finally:
        proc.kill()
        b.stop()


def test_every_n_steps_the_taking_replica_names_the_step_to_resend(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    """N = 3: after step 4 the store holds step 3; B asks for 4 (FAILED_PRECONDITION), and the client's
    resent 4 and then 5 match A's and a reference's answers. B takes it over within one ObserveBatch."""
    a = replica(repo, redis_server.url, session_store_every=3)
    b = replica(repo, redis_server.url, session_store_every=3)
    try:
        with grpc.insecure_channel(a.address) as ch_a, grpc.insecure_channel(b.address) as ch_b:
            stub_a, stub_b = pb_grpc.ForecasterStub(ch_a), pb_grpc.ForecasterStub(ch_b)
            sid = opened(stub_a)
            from_a = [observe(stub_a, sid, seq) for seq in range(1, 5)]
            assert int(stored(db, sid)[b"seq"]) == 3
            steps = [pb.ObserveRequest(session_id=sid, sequence=seq, rows=row(seq)) for seq in (5, 4, 5)]
            answers = stub_b.ObserveBatch(pb.ObserveBatchRequest(steps=steps)).results
            ref = opened(stub_b)
            reference = [observe(stub_b, ref, seq) for seq in range(1, 6)]
        assert answers[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "sequence 5 is out of order; expected 4" in answers[0].error.message
        assert np.array_equal(array(answers[1].forecast), from_a[3])
        assert np.array_equal(array(answers[2].forecast), reference[4])
    finally:
        a.stop()
        b.stop()


def test_a_cut_off_replica_cannot_write_over_its_successor(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    """B takes the session over at step 4 while A still has it: A's own step 4 is computed, but its write is
    refused (B holds the session), so the store keeps B's state, A forgets its copy and A's answer does not
    leave (found by a hostile client: A answered from its stale state, with other rows than B had taken too,
    so two replicas both advanced one session); a retry on A takes the session over and answers B's step."""
    a = replica(repo, redis_server.url)
    b = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(a.address) as ch_a, grpc.insecure_channel(b.address) as ch_b:
            stub_a, stub_b = pb_grpc.ForecasterStub(ch_a), pb_grpc.ForecasterStub(ch_b)
            sid = opened(stub_a)
            for seq in (1, 2, 3):
                observe(stub_a, sid, seq)
            on_b = list(stub_b.Stream(iter([pb.ObserveRequest(session_id=sid, sequence=4, rows=row(4))])))
            assert on_b[0].WhichOneof("result") == "forecast"
            holder = stored(db, sid)[b"holder"]
            assert holder == b.app.store.holder.encode()  # type: ignore[union-attr]
            other = pb.ObserveRequest(session_id=sid, sequence=4, rows=matrix(VALUES[:1]))  # not B's rows
            with pytest.raises(grpc.RpcError) as e:  # A did not see B take it: its write is refused, and so
                stub_a.Observe(other)  # its answer, from the stale state, does not leave
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "held by another replica" in str(e.value.details())
            assert metric(a, "gatecast_session_store_writes_total", outcome="fenced") == 1
            assert a.app.sessions.locate(sid) < 0  # and A forgot its stale copy
            h = stored(db, sid)
            assert h[b"holder"] == holder and int(h[b"seq"]) == 4
            assert np.array_equal(decode_session(h[b"blob"]).forecast, array(on_b[0].forecast))  # type: ignore[arg-type]
            with pytest.raises(grpc.RpcError) as e:  # the retry on A: taken over from the store, B's step 4
                stub_a.Observe(other)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # was applied there, with other rows
            np.testing.assert_array_equal(observe(stub_a, sid, 4), array(on_b[0].forecast))  # B's rows: B's answer
            observe(stub_a, sid, 5)  # A holds it now
            assert int(stored(db, sid)[b"seq"]) == 5
    finally:
        a.stop()
        b.stop()


def test_steps_are_answered_while_redis_is_down(repo: Path, redis_server: RedisServer, db: redis.Redis) -> None:
    srv = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = opened(stub)
            observe(stub, sid, 1)
            redis_server.stop()
            for seq in (2, 3, 4):
                observe(stub, sid, seq, timeout=10)
            assert metric(srv, "gatecast_session_store_errors_total", op="write") >= 1
            with pytest.raises(grpc.RpcError) as e:  # maybe another replica's: cannot tell, so retry later
                observe(stub, "ab" * 16, 1)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "session store cannot be reached" in str(e.value.details())
            redis_server.start()  # same port
            time.sleep(0.6)  # past the pause after an error
            observe(stub, sid, 5)
            assert int(redis.Redis.from_url(redis_server.url).hget(KEY + sid, "seq") or 0) == 5
    finally:
        srv.stop()


def test_unknown_ids_are_not_found(repo: Path, redis_server: RedisServer) -> None:
    srv = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            for sid in ("cd" * 16, "not-an-id"):
                with pytest.raises(grpc.RpcError) as e:
                    observe(stub, sid, 1)
                assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), sid
            with pytest.raises(grpc.RpcError) as e:
                stub.CloseSession(pb.CloseSessionRequest(session_id="cd" * 16))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert metric(srv, "gatecast_sessions_resumed_total", model="taylor", version="1") == 0
        assert metric(srv, "gatecast_session_store_errors_total", op="read") == 0
    finally:
        srv.stop()


def test_a_session_of_a_version_the_replica_lacks_is_refused_clearly(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    srv = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = opened(stub)
            r = decode_session(stored(db, sid)[b"blob"])
            r.id, r.version = "ef" * 16, 99
            db.hset(KEY + r.id, mapping={"blob": encode_session(r), "seq": 0, "holder": "elsewhere"})
            with pytest.raises(grpc.RpcError) as e:
                observe(stub, r.id, 1)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "model 'taylor' version 99, which this replica does not serve" in str(e.value.details())
            assert db.hget(KEY + r.id, "holder") == b"elsewhere"  # not taken: its holder keeps it
    finally:
        srv.stop()


def test_a_moved_session_keeps_its_owner(
    repo: Path, redis_server: RedisServer, db: redis.Redis, tmp_path: Path
) -> None:
    mine, theirs = "m" * 24 + "-token-of-the-owner", "t" * 24 + "-token-of-a-stranger"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{mine}\n{theirs}\n")
    a = replica(repo, redis_server.url, auth_tokens_file=tokens)
    b = replica(repo, redis_server.url, auth_tokens_file=tokens)
    as_owner = {"metadata": [("authorization", f"Bearer {mine}")]}
    as_stranger = {"metadata": [("authorization", f"Bearer {theirs}")]}
    try:
        with grpc.insecure_channel(a.address) as ch_a, grpc.insecure_channel(b.address) as ch_b:
            stub_a, stub_b = pb_grpc.ForecasterStub(ch_a), pb_grpc.ForecasterStub(ch_b)
            sid = opened(stub_a, **as_owner)
            observe(stub_a, sid, 1, **as_owner)
            assert decode_session(stored(db, sid)[b"blob"]).owner == token_name(mine)
            with pytest.raises(grpc.RpcError) as e:  # a stranger neither sees nor moves it
                observe(stub_b, sid, 2, **as_stranger)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert stored(db, sid)[b"holder"] == a.app.store.holder.encode()  # type: ignore[union-attr]
            observe(stub_b, sid, 2, **as_owner)
            assert b.app.sessions.get(sid, token_name(mine)).owner == token_name(mine)
            with pytest.raises(grpc.RpcError) as e:
                observe(stub_b, sid, 3, **as_stranger)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a.stop()
        b.stop()


def test_a_restarted_replica_takes_its_sessions_from_the_store(
    repo: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With a store the snapshot's sessions are left to it: the restarted replica takes the session over
    on its next call and answers as an uninterrupted session does."""
    snapshot = tmp_path / "sessions.snap"
    srv = replica(repo, redis_server.url, snapshot_path=snapshot)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid, ref = opened(stub), opened(stub)
            for seq in (1, 2):
                observe(stub, sid, seq)
            reference = [observe(stub, ref, seq) for seq in (1, 2, 3)]
    finally:
        srv.stop()
    srv = replica(repo, redis_server.url, snapshot_path=snapshot)
    try:
        assert len(srv.app.sessions) == 0
        with grpc.insecure_channel(srv.address) as ch:
            assert np.array_equal(observe(pb_grpc.ForecasterStub(ch), sid, 3), reference[2])
        assert metric(srv, "gatecast_sessions_resumed_total", model="taylor", version="1") == 1
    finally:
        srv.stop()


def test_a_bad_store_url_is_named(repo: Path) -> None:
    with pytest.raises(SettingsError, match="GATECAST_SESSION_STORE_URL"):
        server_settings(repo, session_store_url="http://127.0.0.1:6379")
    with pytest.raises(SettingsError, match="notaport"):
        create_server(server_settings(repo, session_store_url="redis://127.0.0.1:notaport/0"))


def test_the_write_script_takes_only_newer_steps_from_the_holder(db: redis.Redis) -> None:
    write, key = db.register_script(_WRITE), KEY + "12" * 16
    assert [write(keys=[key], args=["a", seq, f"blob {seq}", 60_000]) for seq in (0, 5, 4, 5)] == [1, 1, 0, 0]
    assert write(keys=[key], args=["b", 6, "blob 6", 60_000]) == -1  # not the holder
    db.hset(key, "holder", "b")  # b took it over
    assert write(keys=[key], args=["a", 7, "blob 7", 60_000]) == -1
    assert write(keys=[key], args=["b", 6, "blob 6", 60_000]) == 1
    assert db.hmget(key, ["seq", "blob"]) == [b"6", b"blob 6"]


def test_a_session_closed_on_another_replica_stays_closed(
    repo: Path, redis_server: RedisServer, db: redis.Redis
) -> None:
    a = replica(repo, redis_server.url)
    b = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(a.address) as ch_a, grpc.insecure_channel(b.address) as ch_b:
            stub_a, stub_b = pb_grpc.ForecasterStub(ch_a), pb_grpc.ForecasterStub(ch_b)
            sid = opened(stub_a)
            observe(stub_a, sid, 1)
            closed = stub_b.CloseSession(pb.CloseSessionRequest(session_id=sid))  # taken over, then closed
            assert closed.steps == 480 + 1
            assert stored(db, sid) == {b"closed": b"1"}
            with pytest.raises(grpc.RpcError) as e:  # A had not heard: its write meets the tombstone, so its answer
                observe(stub_a, sid, 2)  # does not leave, and it forgets the session
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "closed there" in str(e.value.details())
            assert a.app.sessions.locate(sid) < 0
            with pytest.raises(grpc.RpcError) as e:
                observe(stub_a, sid, 3)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert stored(db, sid) == {b"closed": b"1"}
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("rpc", ["Observe", "ObserveBatch"])
def test_a_recording_that_fails_partway_records_nothing_and_a_resend_applies_once(
    repo: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """The store's save raises once, after the step's answer, sequence, digest, step count and time were
    written (the last thing recording does): those are put back with the state, the step answers INTERNAL,
    and its resend applies it once. Found in review: the columns stayed written, so the resend was taken for
    a repeat of an applied step and answered from the store while the state had been put back: the step was
    lost (the next forecast differed from a twin's)."""
    from gatecast.service.store import SessionStore

    real = SessionStore.save
    calls: list[int] = []

    def flaky(self: SessionStore, mv: object, sessions: list[object]) -> None:
        calls.append(len(sessions))
        if len(calls) == 1:
            raise RuntimeError("injected: the store could not queue the record")
        real(self, mv, sessions)  # type: ignore[arg-type]

    srv = replica(repo, redis_server.url)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            mine, twins = [opened(stub) for _ in range(3)], [opened(stub) for _ in range(3)]

            def step(ids: list[str], seq: int) -> list[object]:
                if rpc == "Observe":
                    out: list[object] = []
                    for sid in ids:
                        try:
                            out.append(observe(stub, sid, seq))
                        except grpc.RpcError as e:
                            out.append(e.code())  # type: ignore[attr-defined]
                    return out
                steps = [pb.ObserveRequest(session_id=sid, sequence=seq, rows=row(seq)) for sid in ids]
                reply = stub.ObserveBatch(pb.ObserveBatchRequest(steps=steps))
                return [
                    array(r.forecast)
                    if r.HasField("forecast")
                    else grpc.StatusCode.INTERNAL
                    if r.error.code == grpc.StatusCode.INTERNAL.value[0]
                    else r.error.code
                    for r in reply.results
                ]

            monkeypatch.setattr(SessionStore, "save", flaky)
            failed = step(mine, 1)
            monkeypatch.setattr(SessionStore, "save", real)
            # Observe: the first session's step fails alone; ObserveBatch: the block of all three fails
            lost = 1 if rpc == "Observe" else 3
            assert failed[:lost] == [grpc.StatusCode.INTERNAL] * lost
            resent, theirs = step(mine, 1), step(twins, 1)
            after, theirs_after = step(mine, 2), step(twins, 2)
            for got, want in zip(resent + after, theirs + theirs_after, strict=True):
                assert isinstance(got, np.ndarray) and isinstance(want, np.ndarray)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # row 1 applied exactly once
    finally:
        srv.stop()


def test_a_step_run_in_pieces_whose_recording_fails_is_put_back_and_applies_once(
    repo: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten rows with chunk_rows 4 run in three pieces; the store's save raises once: the state the first piece
    found is put back (it was kept, where a step run in pieces had none and a resend applied the rows twice)."""
    from gatecast.service.store import SessionStore

    real = SessionStore.save
    calls: list[int] = []

    def flaky(self: SessionStore, mv: object, sessions: list[object]) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected: the store could not queue the record")
        real(self, mv, sessions)  # type: ignore[arg-type]

    rows = matrix(VALUES[480:490])
    srv = replica(repo, redis_server.url, chunk_rows=4)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            mine, twin = opened(stub), opened(stub)
            monkeypatch.setattr(SessionStore, "save", flaky)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Observe(pb.ObserveRequest(session_id=mine, sequence=1, rows=rows))
            monkeypatch.setattr(SessionStore, "save", real)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            for seq in (1, 2):
                got = array(stub.Observe(pb.ObserveRequest(session_id=mine, sequence=seq, rows=rows)).forecast)
                want = array(stub.Observe(pb.ObserveRequest(session_id=twin, sequence=seq, rows=rows)).forecast)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # the ten rows applied once
    finally:
        srv.stop()
