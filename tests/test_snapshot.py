"""Session snapshots: the blob format on its own, and sessions surviving SIGTERM and kill -9 of the real
server (a subprocess on loopback, a real gRPC client)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.load import start_server
from gatecast.service.snapshot import (
    SessionRecord,
    SnapshotError,
    decode_session,
    encode_session,
    read_file,
    write_file,
)
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, ROOT, RunningServer, array, matrix, server_settings, taylor_values


def _record(sid: str = "ab" * 16, seq: int = 7) -> SessionRecord:
    rng = np.random.default_rng(0)
    return SessionRecord(
        id=sid,
        model="taylor",
        version=3,
        onnx_sha256="f" * 64,
        last_seq=seq,
        steps=500,
        states={"h0": rng.standard_normal((2, 8), dtype=np.float32), "c0": rng.standard_normal((2, 8), np.float32)},
        forecast=rng.standard_normal((48, 1), dtype=np.float32),
        quantile_forecast=rng.standard_normal((48, 1, 3), dtype=np.float32),
        last_digest="0123abcd",
        idle_s=1.5,
    )


def test_session_blob_round_trips_bit_for_bit() -> None:
    r = _record()
    back = decode_session(encode_session(r))
    assert (back.id, back.model, back.version, back.onnx_sha256) == (r.id, r.model, r.version, r.onnx_sha256)
    assert (back.last_seq, back.steps, back.last_digest, back.idle_s) == (7, 500, "0123abcd", 1.5)
    assert set(back.states) == {"h0", "c0"}
    for k in r.states:
        assert back.states[k].dtype == np.float32 and back.states[k].tobytes() == r.states[k].tobytes()
    assert back.forecast is not None and r.forecast is not None
    assert back.forecast.tobytes() == r.forecast.tobytes() and back.forecast.shape == (48, 1)
    assert back.quantile_forecast is not None and r.quantile_forecast is not None
    assert back.quantile_forecast.tobytes() == r.quantile_forecast.tobytes()
    fresh = SessionRecord("cd" * 16, "m", 1, "0" * 64, 0, 0, {"h0": np.zeros((1, 4), np.float32)})
    assert decode_session(encode_session(fresh)).forecast is None  # a session with no step yet


def test_corrupt_blobs_and_files_are_refused(tmp_path: Path) -> None:
    blob = encode_session(_record())
    for bad, why in [
        (blob[:-1], "checksum"),  # truncated
        (blob[:40] + bytes([blob[40] ^ 1]) + blob[41:], "checksum"),  # one flipped bit
        (b"PICKLE\0\0" + blob[8:], "not a gatecast session blob"),
        (blob[:8] + (99).to_bytes(2, "little") + blob[10:], "format 99"),
    ]:
        with pytest.raises(SnapshotError, match=why):
            decode_session(bad)
    path = tmp_path / "s.snap"
    write_file(path, [blob, encode_session(_record("ef" * 16, 9))])
    assert [r.last_seq for r in read_file(path)] == [7, 9]
    assert not [p for p in tmp_path.iterdir() if p.name != "s.snap"], "the temporary file was left behind"
    data = path.read_bytes()
    for bad in (data[:-3], data[: len(data) // 2], data + b"x", data[:30] + bytes([data[30] ^ 4]) + data[31:]):
        path.write_bytes(bad)
        with pytest.raises(SnapshotError, match=f"snapshot {path} is corrupt"):
            read_file(path)


def _repo(tmp_path: Path) -> Path:
    """The committed default model alone (no training needed)."""
    repo = tmp_path / "repo"
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    return repo


def _step(stub: pb_grpc.ForecasterStub, sid: str, seq: int, value: float) -> np.ndarray:
    reply = stub.Observe(pb.ObserveRequest(session_id=sid, sequence=seq, rows=matrix(np.array([[value]]))))
    return array(reply.forecast)


ROWS = [float(v) for v in taylor_values()[400:406, 0]]


def _open(stub: pb_grpc.ForecasterStub) -> str:
    history = matrix(taylor_values()[:400])
    return stub.OpenSession(pb.OpenSessionRequest(model="taylor", history=history)).session_id


def test_sigterm_snapshot_restores_sessions_exactly(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    snap = tmp_path / "sessions.snap"
    env = {"GATECAST_SNAPSHOT_PATH": str(snap), "GATECAST_MAX_QUEUE_DELAY_MS": "300"}
    proc, port = start_server(repo, env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            ref = _open(stub)  # the same client with no restart: its answers are the truth
            want = [_step(stub, ref, i + 1, v) for i, v in enumerate(ROWS)]
            sid = _open(stub)
            got = [_step(stub, sid, i + 1, v) for i, v in enumerate(ROWS[:3])]
            with concurrent.futures.ThreadPoolExecutor(1) as ex:  # step 4 waits 300 ms in the batcher...
                pending = ex.submit(_step, stub, sid, 4, ROWS[3])
                time.sleep(0.1)
                proc.send_signal(signal.SIGTERM)  # ...when SIGTERM arrives: it is finished, then saved
                got.append(pending.result(timeout=30))
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    proc, port = start_server(repo, {"GATECAST_SNAPSHOT_PATH": str(snap)})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            assert stub.GetModel(pb.GetModelRequest(name="taylor")).live_sessions == 2
            np.testing.assert_array_equal(_step(stub, sid, 4, ROWS[3]), got[3])  # a retry is answered again
            with pytest.raises(grpc.RpcError) as e:  # the digest of step 4's rows came back too
                _step(stub, sid, 4, ROWS[3] + 1.0)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "different rows" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                _step(stub, sid, 6, ROWS[5])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "expected 5" in e.value.details()
            got += [_step(stub, sid, 5, ROWS[4]), _step(stub, sid, 6, ROWS[5])]
            reply = stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            assert reply.steps == 400 + 6
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a.tobytes() == b.tobytes(), f"step {i + 1} differs after the restart"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert [r.id for r in read_file(snap)] == [ref]  # the closed session is gone from the next snapshot


def test_kill9_restores_last_periodic_snapshot_and_names_the_expected_sequence(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    snap = tmp_path / "sessions.snap"
    env = {"GATECAST_SNAPSHOT_PATH": str(snap), "GATECAST_SNAPSHOT_INTERVAL_S": "2"}
    proc, port = start_server(repo, env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = _open(stub)
            before = [_step(stub, sid, i + 1, v) for i, v in enumerate(ROWS[:3])]
            deadline = time.monotonic() + 10
            while not any(r.id == sid and r.last_seq == 3 for r in read_file(snap)):
                assert time.monotonic() < deadline, "no periodic snapshot holds step 3"
                time.sleep(0.05)
            before += [_step(stub, sid, 4, ROWS[3]), _step(stub, sid, 5, ROWS[4])]
            proc.kill()  # SIGKILL: no drain, no final snapshot
            proc.wait(timeout=10)
    finally:
        proc.kill()
    (saved,) = read_file(snap)
    assert saved.last_seq == 3, "steps 4-5 reached a snapshot before the kill: the test lost its race"
    cut_short = tmp_path / f".sessions.snap.tmp-{proc.pid}-1"  # what a kill during a write leaves
    cut_short.write_bytes(b"GCSNAP")
    proc, port = start_server(repo, env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ForecasterStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                _step(stub, sid, 6, ROWS[5])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            expected = int(re.search(r"expected (\d+)", e.value.details()).group(1))  # type: ignore[union-attr]
            assert expected == 4
            np.testing.assert_array_equal(_step(stub, sid, 3, ROWS[2]), before[2])  # last saved answer
            again = [_step(stub, sid, seq, ROWS[seq - 1]) for seq in range(expected, 6)]
            for seq, a in zip(range(expected, 6), again, strict=True):
                assert a.tobytes() == before[seq - 1].tobytes(), f"step {seq} differs after kill -9"
        assert not cut_short.exists(), "the dead writer's temporary file was left behind"
    finally:
        proc.kill()


def test_corrupt_snapshot_stops_start_with_one_line(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    snap = tmp_path / "sessions.snap"
    write_file(snap, [encode_session(_record())])
    data = bytearray(snap.read_bytes())
    data[-20] ^= 0xFF  # inside the session's tensors
    snap.write_bytes(bytes(data))
    env = {**os.environ, "GATECAST_SNAPSHOT_PATH": str(snap), "GATECAST_PROVIDERS": '["CPUExecutionProvider"]'}
    cmd = [sys.executable, "-m", "gatecast.cli", "serve", "--repo", str(repo), "--port", "0", "--metrics-port", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(snap) in errors[0] and "corrupt" in errors[0], proc.stderr
    assert snap.read_bytes() == bytes(data), "a refused snapshot must be left as it was"


def test_a_session_with_a_step_in_flight_is_written_as_it_was(tmp_path: Path) -> None:
    snap = tmp_path / "sessions.snap"
    settings = server_settings(_repo(tmp_path), snapshot_path=snap, snapshot_interval_s=3600, max_queue_delay_ms=600)
    srv = RunningServer(settings)
    assert srv.app.snapshots is not None
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
            _step(stub, sid, 1, ROWS[0])
            srv.call(srv.app.snapshots.save())
            (first,) = read_file(snap)
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                pending = ex.submit(_step, stub, sid, 2, ROWS[1])  # waits 600 ms in the batcher
                time.sleep(0.2)
                assert srv.app.sessions.get(sid).busy
                assert srv.call(srv.app.snapshots.save()) == 1
                (during,) = read_file(snap)
                pending.result(timeout=10)
            assert during.last_seq == 1 and encode_session(during) == encode_session(first)
            srv.call(srv.app.snapshots.save())
            (after,) = read_file(snap)
            assert after.last_seq == 2 and after.states["h0"].tobytes() != first.states["h0"].tobytes()
    finally:
        srv.stop()


def test_sessions_of_a_version_no_longer_served_are_dropped_and_their_snapshot_kept(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    snap = tmp_path / "sessions.snap"
    srv = RunningServer(server_settings(repo, snapshot_path=snap))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            sid = _open(pb_grpc.ForecasterStub(ch))
    finally:
        srv.stop()  # writes the snapshot
    assert [r.id for r in read_file(snap)] == [sid]
    manifest = repo / "taylor" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 2'))
    (repo / "taylor" / "1").rename(repo / "taylor" / "2")
    srv = RunningServer(server_settings(repo, snapshot_path=snap))
    try:
        assert len(srv.app.sessions) == 0
        (kept,) = tmp_path.glob("sessions.snap.*.unrestored")
        assert [r.id for r in read_file(kept)] == [sid]
    finally:
        srv.stop()


def test_one_session_moves_to_another_server_as_a_blob(tmp_path: Path) -> None:
    from gatecast.service.snapshot import export_session, restore_session

    async def on_loop(f):  # type: ignore[no-untyped-def]
        return f()

    repo = _repo(tmp_path)
    a, b = RunningServer(server_settings(repo)), RunningServer(server_settings(repo))
    try:
        with grpc.insecure_channel(a.address) as cha, grpc.insecure_channel(b.address) as chb:
            stub_a, stub_b = pb_grpc.ForecasterStub(cha), pb_grpc.ForecasterStub(chb)
            sid = _open(stub_a)
            first = _step(stub_a, sid, 1, ROWS[0])
            blob = a.call(on_loop(lambda: export_session(a.app.sessions, sid)))
            b.call(on_loop(lambda: restore_session(b.app.sessions, b.app.repo, decode_session(blob))))
            assert _step(stub_b, sid, 1, ROWS[0]).tobytes() == first.tobytes()  # its last answer came along
            for seq, v in enumerate(ROWS[1:], start=2):  # and it goes on exactly as it would have on a
                assert _step(stub_b, sid, seq, v).tobytes() == _step(stub_a, sid, seq, v).tobytes()
    finally:
        a.stop()
        b.stop()


def test_a_record_refused_on_restore_leaves_no_live_session(tmp_path: Path) -> None:
    """Found by a hostile test: a blob with a valid checksum but a negative last_seq, or a digest that is not
    hex, was reported "not restored" while the session had been put in the table first and served (with
    last_seq -5 it accepted sequence 1 on a state 6 steps in) and went into the next snapshot."""
    import dataclasses

    from gatecast.service.snapshot import SnapshotError, export_session, restore_session

    async def on_loop(f):  # type: ignore[no-untyped-def]
        return f()

    repo = _repo(tmp_path)
    srv = RunningServer(server_settings(repo))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ForecasterStub(ch)
            sid = _open(stub)
            _step(stub, sid, 1, ROWS[0])
            good = decode_session(srv.call(on_loop(lambda: export_session(srv.app.sessions, sid))))
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            bad = [
                dataclasses.replace(good, last_seq=-5),
                dataclasses.replace(good, steps=-1),
                dataclasses.replace(good, last_digest="zz"),
                dataclasses.replace(good, forecast=np.zeros((3, 3, 3), np.float32)),  # not the model's shape
            ]
            for record in bad:
                with pytest.raises(SnapshotError):
                    srv.call(on_loop(lambda r=record: restore_session(srv.app.sessions, srv.app.repo, r)))
                assert srv.app.sessions.locate(sid) < 0, record  # not live
                with pytest.raises(grpc.RpcError) as e:
                    _step(stub, sid, 1, ROWS[0])
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            srv.call(on_loop(lambda: restore_session(srv.app.sessions, srv.app.repo, good)))  # the good one comes back
            _step(stub, sid, 2, ROWS[1])
    finally:
        srv.stop()
