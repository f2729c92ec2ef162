"""Replicas behind HAProxy (deploy/haproxy.cfg, launched by deploy/cluster.py): sessions routed by the
metadata x-gatecast-session on a consistent-hash ring, one-shot calls spread, and a replica killed under load.
The proxy, the replicas (`gatecast serve` processes) and Redis are the real ones, on loopback."""

from __future__ import annotations

import re
import secrets
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from deploy.cluster import Cluster
from deploy.packages import ensure_installed
from gatecast import SESSION_HEADER
from gatecast.errors import UserError
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, RunningServer, array, matrix, server_settings, taylor_values

SERVE_ARGS = ("--providers", "CPUExecutionProvider", "--max-queue-delay-ms", "2", "--session-sweep-s", "0.5")

# --- the server adopts a session id the client proposes (what lets a proxy route OpenSession) --------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cluster_repo")
    (repo / "taylor").symlink_to(DEFAULT_MODEL)
    return repo


@pytest.fixture(scope="module")
def single(repo: Path) -> Iterator[RunningServer]:
    """One uninterrupted server: the reference the cluster's answers must equal."""
    srv = RunningServer(server_settings(repo))
    yield srv
    srv.stop()


def _open(stub: pb_grpc.ForecasterStub, proposed: str | None) -> pb.OpenSessionResponse:
    metadata = [(SESSION_HEADER, proposed)] if proposed is not None else None
    return stub.OpenSession(pb.OpenSessionRequest(model="taylor"), metadata=metadata, timeout=10)  # type: ignore[no-any-return]


def test_a_proposed_session_id_is_adopted_and_a_taken_or_malformed_one_refused(single: RunningServer) -> None:
    with grpc.insecure_channel(single.address) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        proposed = secrets.token_hex(16)
        assert _open(stub, proposed).session_id == proposed
        step = stub.Observe(pb.ObserveRequest(session_id=proposed, sequence=1, rows=matrix([[30000.0]])))
        assert step.forecast.rows == 48
        with pytest.raises(grpc.RpcError) as taken:
            _open(stub, proposed)
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert proposed in taken.value.details() and SESSION_HEADER in taken.value.details()
        # the live session is untouched by the refused open
        again = stub.Observe(pb.ObserveRequest(session_id=proposed, sequence=1, rows=matrix([[30000.0]])))
        assert again.forecast == step.forecast
        for bad in ("ABCDEF" * 6, "0" * 31, "xyz", ""):
            with pytest.raises(grpc.RpcError) as malformed:
                _open(stub, bad)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert SESSION_HEADER in malformed.value.details() and "32" in malformed.value.details()
        assert len(_open(stub, None).session_id) == 32  # no proposal: the server draws one
        assert stub.CloseSession(pb.CloseSessionRequest(session_id=proposed)).steps == 1


def test_the_python_client_proposes_the_id_and_sends_it_on_every_session_call(single: RunningServer) -> None:
    from gatecast.client import Client

    seen: list[tuple[str, str]] = []

    class Recording(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
            header = dict(details.metadata or ()).get(SESSION_HEADER, "")
            seen.append((details.method.rsplit("/", 1)[1], header))
            return continuation(details, request)

    with Client(single.address) as client:
        client.channel = grpc.intercept_channel(client.channel, Recording())
        client.stub = pb_grpc.ForecasterStub(client.channel)
        with client.session("taylor") as session:
            assert session.id == session.proposed
            session.observe(np.full((2, 1), 30000.0, np.float32))
            session.observe(np.full((1, 1), 31000.0, np.float32))
        client.forecast(np.full((432, 1), 30000.0, np.float32), "taylor")
    calls = [(m, h) for m, h in seen if m != "GetModel"]
    assert calls[:4] == [(m, session.proposed) for m in ("OpenSession", "Observe", "Observe", "CloseSession")]
    assert calls[4:] == [("Forecast", "")]  # a one-shot call carries no session header


def test_a_client_whose_open_was_applied_but_unanswered_starts_anew(single: RunningServer) -> None:
    """A retried OpenSession whose first attempt opened the session (its answer lost) finds its own id live:
    the client closes that session and opens under a fresh id instead of failing."""
    from gatecast.client import Client

    with Client(single.address) as client, grpc.insecure_channel(single.address) as channel:
        session = client.session("taylor")
        first = session.proposed
        _open(pb_grpc.ForecasterStub(channel), first)  # the attempt whose answer never came back
        session.open()
        assert session.id == session.proposed != first
        with pytest.raises(grpc.RpcError) as gone:
            pb_grpc.ForecasterStub(channel).CloseSession(pb.CloseSessionRequest(session_id=first))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert session.close() == 0


# --- the cluster: three replicas, HAProxy, Redis (when the server has the session store) ----------------


@pytest.fixture(scope="module")
def cluster(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    with Cluster(repo, str(workdir / "grpc.sock"), workdir=workdir, serve_args=SERVE_ARGS) as c:
        yield c


@pytest.fixture()
def stub(cluster: Cluster) -> Iterator[pb_grpc.ForecasterStub]:
    with grpc.insecure_channel(cluster.target) as channel:
        yield pb_grpc.ForecasterStub(channel)


def _replica(call: grpc.Call | grpc.RpcError) -> str:
    """Which replica answered: the proxy's response metadata (initial, or trailing on an error)."""
    found = dict(call.initial_metadata() or ()) | dict(call.trailing_metadata() or ())  # type: ignore[attr-defined]
    return str(found["x-gatecast-replica"])


def _owner(stub: pb_grpc.ForecasterStub, key: str) -> str:
    """The replica the ring sends `key` to, asked without touching any session: an Observe whose body is
    malformed is refused (INVALID_ARGUMENT) by the replica its header routes to."""
    with pytest.raises(grpc.RpcError) as refused:
        stub.Observe(pb.ObserveRequest(session_id="", sequence=1), metadata=[(SESSION_HEADER, key)], timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return _replica(refused.value)


def test_a_sessions_calls_all_reach_one_replica_and_one_shot_calls_spread(stub: pb_grpc.ForecasterStub) -> None:
    served: dict[str, set[str]] = {}
    for k in range(24):
        sid = secrets.token_hex(16)
        opened, call = stub.OpenSession.with_call(
            pb.OpenSessionRequest(model="taylor"), metadata=[(SESSION_HEADER, sid)], timeout=10
        )
        assert opened.session_id == sid
        served[sid] = {_replica(call)}
        for seq in (1, 2):
            rows = matrix([[30000.0 + 100 * k + seq]])
            _, call = stub.Observe.with_call(
                pb.ObserveRequest(session_id=sid, sequence=seq, rows=rows), metadata=[(SESSION_HEADER, sid)]
            )
            served[sid].add(_replica(call))
        _, call = stub.CloseSession.with_call(pb.CloseSessionRequest(session_id=sid), metadata=[(SESSION_HEADER, sid)])
        served[sid].add(_replica(call))
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert set().union(*served.values()) == {"r1", "r2", "r3"}  # 24 sessions over the ring reach all three
    one_shots = Counter(_replica(stub.ListModels.with_call(pb.ListModelsRequest())[1]) for _ in range(12))
    assert set(one_shots) == {"r1", "r2", "r3"}, one_shots
    # a session call without the header is still answered (by any replica): here a clean NOT_FOUND
    with pytest.raises(grpc.RpcError) as unrouted:
        stub.Observe(pb.ObserveRequest(session_id=secrets.token_hex(16), sequence=1, rows=matrix([[1.0]])))
    assert unrouted.value.code() == grpc.StatusCode.NOT_FOUND


def test_adding_a_replica_to_the_ring_moves_only_the_sessions_it_takes(
    cluster: Cluster, stub: pb_grpc.ForecasterStub
) -> None:
    keys = [secrets.token_hex(16) for _ in range(240)]
    before = {k: _owner(stub, k) for k in keys}
    assert all(n > 40 for n in Counter(before.values()).values()), Counter(before.values())
    cluster.add_replica("r4")
    try:
        after = {k: _owner(stub, k) for k in keys}
    finally:
        for backend in ("sessions", "oneshot"):  # back to three: the kill test below runs on them
            cluster.admin(f"set server {backend}/r4 state maint")
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == "r4" for k in moved)  # nothing moves between the replicas already there
    assert 0.12 < len(moved) / len(keys) < 0.40, len(moved)  # about 1/4 of them move, to the new replica
    assert {k: _owner(stub, k) for k in keys} == before  # off the ring again: every key back where it was


def test_a_replica_killed_under_load(cluster: Cluster, single: RunningServer, stub: pb_grpc.ForecasterStub) -> None:
    """30 sessions stepped from 6 threads and one-shot Forecasts from 2 more; a replica holding sessions is
    SIGKILLed halfway. With the store every session goes on with exactly the forecasts an uninterrupted
    server gives; without it, the dead replica's sessions end with a clean NOT_FOUND and the others go on
    exactly. One-shot calls fail at most as many as were in flight."""
    from gatecast.client import Client, ClientError

    n_sessions, steps, threads, one_shot_threads = 30, 12, 6, 2
    series = taylor_values()
    data = [series[100 * k : 100 * k + steps] for k in range(n_sessions)]
    history = series[-96:]  # a short history: one-shot load, not one-shot CPU
    with grpc.insecure_channel(single.address) as channel:  # the reference: one server, never interrupted
        ref_stub = pb_grpc.ForecasterStub(channel)
        reference = []
        for rows in data:
            sid = ref_stub.OpenSession(pb.OpenSessionRequest(model="taylor")).session_id
            observe = [
                pb.ObserveRequest(session_id=sid, sequence=t + 1, rows=matrix(r[None])) for t, r in enumerate(rows)
            ]
            reference.append([array(ref_stub.Observe(req).forecast) for req in observe])
        one_shot = pb.ForecastRequest(model="taylor", series=[matrix(history)])
        ref_one_shot = array(ref_stub.Forecast(one_shot).forecasts[0])

    with Client(cluster.target, timeout=20) as client:
        sessions = [client.session("taylor").open() for _ in range(n_sessions)]
        owners = [_owner(stub, s.id) for s in sessions]
        victim = Counter(owners).most_common(1)[0][0]
        got: list[list[np.ndarray]] = [[] for _ in sessions]
        ended: dict[int, ClientError] = {}
        done = threading.Event()
        half = threading.Event()
        progress = Counter[str]()
        one_shot_failures: list[str] = []
        one_shot_answers: list[np.ndarray] = []

        def step_sessions(ks: list[int]) -> None:
            for t in range(steps):
                for k in ks:
                    if k in ended:
                        continue
                    try:
                        got[k].append(sessions[k].observe(data[k][t : t + 1]).to_numpy())
                    except ClientError as e:
                        ended[k] = e
                    progress["steps"] += 1
                    if progress["steps"] >= n_sessions * steps // 2:
                        half.set()

        def fire_one_shots() -> None:
            while not done.is_set():
                try:
                    one_shot_answers.append(client.forecast(history, "taylor").to_numpy())
                except ClientError as e:
                    one_shot_failures.append(str(e))

        workers = [
            threading.Thread(target=step_sessions, args=(list(range(i, n_sessions, threads)),)) for i in range(threads)
        ]
        shooters = [threading.Thread(target=fire_one_shots) for _ in range(one_shot_threads)]
        for w in workers + shooters:
            w.start()
        assert half.wait(60)
        cluster.kill(victim)
        for w in workers:
            w.join(60)
        done.set()
        for w in shooters:
            w.join(60)

    victims = {k for k, o in enumerate(owners) if o == victim}
    assert victims and len(victims) < n_sessions
    with_store = cluster.store
    for k in range(n_sessions):
        if with_store or k not in victims:
            assert k not in ended, (k, ended.get(k))
            assert len(got[k]) == steps
        else:  # the session died with its replica: a clean NOT_FOUND, after steps that were exact
            assert ended[k].code == grpc.StatusCode.NOT_FOUND, ended[k]
            assert sessions[k].id in str(ended[k])
            assert 0 < len(got[k]) < steps
        for t, y in enumerate(got[k]):
            np.testing.assert_allclose(y, reference[k][t], rtol=1e-6, err_msg=f"session {k} step {t + 1}")
    assert len(one_shot_failures) <= one_shot_threads, one_shot_failures  # only those in flight at the kill
    assert len(one_shot_answers) > 0
    for y in one_shot_answers:
        np.testing.assert_allclose(y, ref_one_shot, rtol=1e-6)


def test_a_replica_that_cannot_start_is_reported_with_its_log_and_nothing_is_left(repo: Path, tmp_path: Path) -> None:
    from gatecast.errors import UserError

    cluster = Cluster(repo, str(tmp_path / "grpc.sock"), store=False, workdir=tmp_path, serve_args=("--max-rows", "0"))
    with pytest.raises(UserError, match=r"replica r1 did not start .*GATECAST_MAX_ROWS"):
        cluster.start()
    assert not cluster._processes
    assert all((tmp_path / f"{r}.log").exists() for r in ("r1", "r2", "r3"))  # all three were started and stopped


# --- the Kubernetes form: the same proxy config, its names matching the StatefulSet's pods -----------------


def test_the_kubernetes_manifests_run_the_same_proxy_config_over_the_statefulsets_pods() -> None:
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    kustomization = yaml.safe_load((deploy / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((deploy / f).read_text())]
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    replicas = kinds["StatefulSet", "gatecast"]["spec"]
    headless = kinds["Service", replicas["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None"
    assert kustomization["configMapGenerator"] == [{"name": "gatecast-haproxy", "files": ["haproxy.cfg"]}]
    proxy = kinds["Deployment", "gatecast-proxy"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in proxy["containers"][0]["env"]}
    config = (deploy / "haproxy.cfg").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", config)) <= set(env)  # every variable the config reads is set
    slots = re.findall(r"^\s+server (r\d) \"\$\{(GATECAST_REPLICA_\d)\}\" id \d+( disabled)?$", config, re.M)
    enabled = [var for _, var, off in slots if not off]
    assert len(enabled) == replicas["replicas"] == 3
    for n, (_, var, _) in enumerate(slots):
        assert env[var] == f"gatecast-{n}.{replicas['serviceName']}:8500"  # pod n is server r(n+1)
    store = {e["name"]: e["value"] for e in replicas["template"]["spec"]["containers"][0]["env"]}
    assert store["GATECAST_SESSION_STORE_URL"].startswith(
        f"redis://{kinds['Service', 'gatecast-redis']['metadata']['name']}:"
    )
    mount = proxy["containers"][0]["volumeMounts"][0]["mountPath"]
    assert proxy["containers"][0]["args"][-1] == f"{mount}/haproxy.cfg"
    try:
        haproxy = ensure_installed("haproxy", "haproxy")
    except UserError as e:
        pytest.skip(str(e))
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(deploy / "haproxy.cfg")],
        env={**env, "GATECAST_PROXY_ADMIN": "/tmp/x.sock"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr  # valid; pod names that do not resolve here wait for DNS
