"""TLS, mutual TLS, bearer tokens, session ownership and connection limits, against the real server on
loopback with certificates made here (a CA, a server certificate for localhost/127.0.0.1, client
certificates from that CA and from another one)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gatecast.service.auth import TokenFile, server_credentials, token_name
from gatecast.service.server import connection_options, create_server
from gatecast.service.settings import SettingsError
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, RunningServer, matrix, server_settings

# own connection per channel: grpc otherwise shares one connection between channels to the same address
OWN = [("grpc.use_local_subchannel_pool", 1)]
TOKEN_A = "a" * 24 + "-token-of-client-a"
TOKEN_B = "b" * 24 + "-token-of-client-b"
ROW = matrix(np.ones((1, 1)))
KSERVE_LIVE = "/inference.GRPCInferenceService/ServerLive"  # raw bytes: an empty request is a valid one


# --- certificates -------------------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, san: list[Any] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatecast test"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


@dataclass
class Pki:
    dir: Path
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
    rogue_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    @property
    def ca_pem(self) -> bytes:
        return _pem(self.ca[0])

    def client(self, cn: str, rogue: bool = False) -> grpc.ChannelCredentials:
        """TLS credentials trusting our CA, with a client certificate (from the other CA when rogue)."""
        cert, key = _issue(cn, self.rogue_ca if rogue else self.ca)
        return grpc.ssl_channel_credentials(self.ca_pem, _key_pem(key), _pem(cert))


def make_pki(folder: Path) -> Pki:
    """A CA, another CA, and in `folder`: ca.pem, server.pem and server.key (for localhost and 127.0.0.1),
    client.pem and client.key (CN=client, from the CA). benchmarks/security.py uses them too."""
    pki = Pki(folder, _issue("gatecast test CA"), _issue("someone else's CA"))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name, (cert, key) in {"server": _issue("localhost", pki.ca, san), "client": _issue("client", pki.ca)}.items():
        pki.write(f"{name}.pem", _pem(cert))
        pki.write(f"{name}.key", _key_pem(key))
    pki.write("ca.pem", pki.ca_pem)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the committed default model: no training."""
    repo = tmp_path_factory.mktemp("security")
    shutil.copytree(DEFAULT_MODEL, repo / "taylor")
    return repo


def _tls(pki: Pki, **kw: Any) -> dict[str, Any]:
    return dict(tls_cert_file=pki.dir / "server.pem", tls_key_file=pki.dir / "server.key", **kw)


def _channel(srv: RunningServer, creds: grpc.ChannelCredentials | None, options: list[Any] = OWN) -> grpc.Channel:
    if creds is None:
        return grpc.insecure_channel(srv.address, options=options)
    return grpc.secure_channel(srv.address, creds, options=options)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), str(e.value.details())


# --- mutual TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(pki: Pki, repo: Path) -> Iterator[RunningServer]:
    settings = server_settings(
        repo, **_tls(pki, tls_client_ca_file=pki.dir / "ca.pem", metrics_tls=True, max_sessions_per_identity=2)
    )
    srv = RunningServer(settings)
    yield srv
    srv.stop()


def test_mtls_client_with_a_certificate_from_the_ca_is_served(mtls: RunningServer, pki: Pki) -> None:
    with _channel(mtls, pki.client("client-a")) as ch:
        models = pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert [m.name for m in models.models] == ["taylor"]


@pytest.mark.parametrize("client", ["plain text", "no client certificate", "certificate from another CA"])
def test_mtls_refuses_clients_without_a_good_certificate(mtls: RunningServer, pki: Pki, client: str) -> None:
    creds = {
        "plain text": None,
        "no client certificate": grpc.ssl_channel_credentials(pki.ca_pem),
        "certificate from another CA": pki.client("intruder", rogue=True),
    }[client]
    with _channel(mtls, creds) as ch:
        code, _ = _code(lambda: pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
        # health too: the handshake refuses the connection before any method is chosen
        code, _ = _code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_certificate_fails(mtls: RunningServer, pki: Pki) -> None:
    cert, key = _issue("client-a", pki.ca)
    creds = grpc.ssl_channel_credentials(_pem(pki.rogue_ca[0]), _key_pem(key), _pem(cert))
    with _channel(mtls, creds) as ch:
        code, _ = _code(lambda: pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_session_is_reachable_only_by_the_certificate_that_opened_it(mtls: RunningServer, pki: Pki) -> None:
    with _channel(mtls, pki.client("owner")) as a, _channel(mtls, pki.client("other")) as b:
        owner, other = pb_grpc.ForecasterStub(a), pb_grpc.ForecasterStub(b)
        sid = owner.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=10).session_id
        observe = pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW)
        # NOT_FOUND, worded like a missing session: whether the id exists does not leak
        code, details = _code(lambda: other.Observe(observe, timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND and "not found" in details
        (reply,) = other.Stream(iter([observe]), timeout=10)
        assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0] and not reply.HasField("forecast")
        code, _ = _code(lambda: other.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND
        assert owner.Observe(observe, timeout=10).forecast.rows > 0  # untouched by the other's attempts
        (reply,) = owner.Stream(iter([pb.ObserveRequest(session_id=sid, sequence=2, rows=ROW)]), timeout=10)
        assert reply.forecast.rows > 0
        assert owner.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10).steps == 2


def test_sessions_per_identity_are_capped(mtls: RunningServer, pki: Pki) -> None:
    with _channel(mtls, pki.client("greedy")) as a, _channel(mtls, pki.client("modest")) as b:
        greedy, modest = pb_grpc.ForecasterStub(a), pb_grpc.ForecasterStub(b)
        open_ = pb.OpenSessionRequest(model="taylor")
        held = [greedy.OpenSession(open_, timeout=10).session_id for _ in range(2)]
        code, details = _code(lambda: greedy.OpenSession(open_, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CN=greedy" in details and "holds 2" in details and "GATECAST_MAX_SESSIONS_PER_IDENTITY = 2" in details
        other = modest.OpenSession(open_, timeout=10).session_id  # another identity is not held back
        greedy.CloseSession(pb.CloseSessionRequest(session_id=held.pop()), timeout=10)
        held.append(greedy.OpenSession(open_, timeout=10).session_id)  # a closed session frees its place
        for sid in held:
            greedy.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
        modest.CloseSession(pb.CloseSessionRequest(session_id=other), timeout=10)


def test_metrics_take_the_same_certificate_and_client_ca(mtls: RunningServer, pki: Pki) -> None:
    url = f"https://127.0.0.1:{mtls.app.metrics_port}/metrics"
    ctx = ssl.create_default_context(cadata=pki.ca_pem.decode())
    cert, key = _issue("prometheus", pki.ca)
    ctx.load_cert_chain(pki.write("prom.pem", _pem(cert)), pki.write("prom.key", _key_pem(key)))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        assert r.status == 200 and b"gatecast_" in r.read()
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # no client certificate
        urllib.request.urlopen(url, context=ssl.create_default_context(cadata=pki.ca_pem.decode()), timeout=10)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{mtls.app.metrics_port}/metrics", timeout=10).read()


def test_too_frequent_client_pings_are_refused_at_the_default(mtls: RunningServer, pki: Pki) -> None:
    """min_client_ping_interval_s (10 s) reaches grpc core: a client pinging every 100 ms on an open call
    is sent GOAWAY too_many_pings and its call ends. (test_pings_within_the_setting_are_allowed is the
    counterpart: there the same client is fine.)"""
    with _channel(mtls, pki.client("pinger"), OWN + _PINGER) as ch:
        code, details = _code(lambda: list(pb_grpc.ForecasterStub(ch).Stream(_idle_stream(8.0), timeout=30)))
        assert code == grpc.StatusCode.UNAVAILABLE and "too_many_pings" in details.lower().replace(" ", "_")


_PINGER = [
    ("grpc.keepalive_time_ms", 100),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _idle_stream(seconds: float, done: threading.Event | None = None) -> Iterator[pb.ObserveRequest]:
    """A request stream that sends nothing for `seconds` (or until `done` is set), then ends."""
    (done or threading.Event()).wait(seconds)
    return
    yield


# --- TLS with bearer tokens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_file(pki: Pki) -> Path:
    return pki.write("tokens", f"# gatecast clients\n{TOKEN_A}\n\n{TOKEN_B}\n".encode())


@pytest.fixture(scope="module")
def tokened(pki: Pki, repo: Path, tokens_file: Path) -> Iterator[RunningServer]:
    srv = RunningServer(server_settings(repo, **_tls(pki, auth_tokens_file=tokens_file)))
    yield srv
    srv.stop()


@pytest.fixture()
def tls_channel(tokened: RunningServer, pki: Pki) -> Iterator[grpc.Channel]:
    """TLS without a client certificate: the server's certificate is checked against our CA."""
    with _channel(tokened, grpc.ssl_channel_credentials(pki.ca_pem)) as ch:
        yield ch


def _auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tls_client_with_a_token_is_served(tokened: RunningServer, pki: Pki, tls_channel: grpc.Channel) -> None:
    models = pb_grpc.ForecasterStub(tls_channel).ListModels(pb.ListModelsRequest(), timeout=10, metadata=_auth(TOKEN_A))
    assert [m.name for m in models.models] == ["taylor"]
    assert tls_channel.unary_unary(KSERVE_LIVE)(b"", timeout=10, metadata=_auth(TOKEN_A)) is not None
    # grpc's own call credentials send the same header
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(pki.ca_pem), grpc.access_token_call_credentials(TOKEN_B)
    )
    with _channel(tokened, creds) as ch:
        assert pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models


def test_plain_text_to_a_tls_port_is_refused(tokened: RunningServer) -> None:
    with _channel(tokened, None) as ch:
        code, _ = _code(
            lambda: pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10, metadata=_auth(TOKEN_A))
        )
        assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ([], "no bearer token"),
        (_auth("x" * 40), "not accepted"),
        (_auth(TOKEN_A[:-1]), "not accepted"),
        ([("authorization", f"Basic {TOKEN_A}")], "no bearer token"),
    ],
    ids=["missing", "unknown", "one character short", "not bearer"],
)
def test_calls_without_a_good_token_are_unauthenticated(
    tls_channel: grpc.Channel, metadata: list[tuple[str, str]], says: str
) -> None:
    stub = pb_grpc.ForecasterStub(tls_channel)
    code, details = _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED and says in details
    assert TOKEN_A not in details
    code, _ = _code(lambda: stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=10, metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # a stream is refused before its first message; reflection is behind the token too
    code, _ = _code(lambda: list(stub.Stream(iter([]), timeout=10, metadata=metadata)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    reflect = reflection_pb2_grpc.ServerReflectionStub(tls_channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    code, _ = _code(lambda: list(reflect.ServerReflectionInfo(iter([listing]), timeout=10, metadata=metadata)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: tls_channel.unary_unary(KSERVE_LIVE)(b"", timeout=10, metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED  # the KServe v2 front too
    code, _ = _code(lambda: tls_channel.unary_unary("/no.Such/Method")(b"", timeout=10, metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED  # the API is not probed without a token


def test_health_is_open_without_a_token_and_reflection_with_one(tls_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(tls_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(tls_channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = reflect.ServerReflectionInfo(iter([listing]), timeout=10, metadata=_auth(TOKEN_B))
    assert "gatecast.v1.Forecaster" in [s.name for s in reply.list_services_response.service]


def test_a_session_is_reachable_only_with_the_token_that_opened_it(tls_channel: grpc.Channel) -> None:
    stub = pb_grpc.ForecasterStub(tls_channel)
    sid = stub.OpenSession(pb.OpenSessionRequest(model="taylor"), timeout=10, metadata=_auth(TOKEN_A)).session_id
    observe = pb.ObserveRequest(session_id=sid, sequence=1, rows=ROW)
    code, _ = _code(lambda: stub.Observe(observe, timeout=10, metadata=_auth(TOKEN_B)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(
        lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=_auth(TOKEN_B))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert stub.Observe(observe, timeout=10, metadata=_auth(TOKEN_A)).forecast.rows > 0
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=_auth(TOKEN_A))


def test_the_token_file_is_reread_when_it_changes(tls_channel: grpc.Channel, tokens_file: Path) -> None:
    stub = pb_grpc.ForecasterStub(tls_channel)
    new = "n" * 32
    original = tokens_file.read_bytes()

    def answer(token: str) -> grpc.StatusCode:
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=_auth(token))
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    def rotate(text: bytes) -> None:
        tmp = tokens_file.with_name("tokens.new")
        tmp.write_bytes(text)
        os.replace(tmp, tokens_file)  # a new file in place, as deployment tools write it

    def settles(token: str, code: grpc.StatusCode) -> bool:
        end = time.monotonic() + 10
        while answer(token) != code and time.monotonic() < end:
            time.sleep(0.2)
        return answer(token) == code

    try:
        assert answer(new) == grpc.StatusCode.UNAUTHENTICATED
        rotate(f"{new}\n{TOKEN_B}\n".encode())
        assert settles(new, grpc.StatusCode.OK)
        assert answer(TOKEN_A) == grpc.StatusCode.UNAUTHENTICATED  # revoked
        assert answer(TOKEN_B) == grpc.StatusCode.OK
        rotate(b"")  # emptied on purpose: every token is revoked (fail closed)
        assert settles(TOKEN_B, grpc.StatusCode.UNAUTHENTICATED)
        assert health_pb2_grpc.HealthStub(tls_channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    finally:
        rotate(original)
        assert settles(TOKEN_A, grpc.StatusCode.OK)


# --- connection limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """No model needed: ListModels and an idle Stream are enough to hold connections and calls."""
    settings = server_settings(
        tmp_path_factory.mktemp("empty"),
        max_connections=1,
        max_concurrent_streams=1,
        min_client_ping_interval_s=0.05,
        max_connection_age_s=0,
    )
    srv = RunningServer(settings)
    yield srv
    srv.stop()


def _list(ch: grpc.Channel, timeout: float = 10) -> Any:
    return pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=timeout)


def _eventually(call: Callable[[], Any], seconds: float = 10) -> Any:
    """The call once the server has noticed that an earlier connection went away."""
    end = time.monotonic() + seconds
    while True:
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def test_connections_beyond_max_connections_are_refused(limited: RunningServer) -> None:
    with _channel(limited, None) as first:
        _eventually(lambda: _list(first))
        with _channel(limited, None) as second:
            code, _ = _code(lambda: _list(second))
            assert code == grpc.StatusCode.UNAVAILABLE
        _list(first)  # the connection that holds the place goes on
    with _channel(limited, None) as third:
        _eventually(lambda: _list(third))  # the place is free again once the first has gone


def test_calls_beyond_max_concurrent_streams_wait(limited: RunningServer) -> None:
    with _channel(limited, None) as ch:
        _eventually(lambda: _list(ch))
        stub = pb_grpc.ForecasterStub(ch)
        holding = stub.Stream(_idle_stream(1.5), timeout=30)  # one call open on the connection
        time.sleep(0.3)
        code, _ = _code(lambda: _list(ch, timeout=1))  # the second waits for the first, past its deadline
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert list(holding) == []
        _list(ch)


def test_pings_within_the_setting_are_allowed(limited: RunningServer) -> None:
    """min_client_ping_interval_s = 0.05 s here: the client that the default refuses (see
    test_too_frequent_client_pings_are_refused_at_the_default) keeps its call."""
    with _channel(limited, None, OWN + _PINGER) as ch:
        _eventually(lambda: _list(ch))
        assert list(pb_grpc.ForecasterStub(ch).Stream(_idle_stream(5.0), timeout=30)) == []


def test_a_connection_is_closed_after_max_connection_age(tmp_path: Path) -> None:
    srv = RunningServer(server_settings(tmp_path, max_connection_age_s=0.5, max_connection_age_grace_s=0.5))
    done = threading.Event()
    try:
        with _channel(srv, None) as ch:
            # an idle stream would end well after 20 s; the connection's age cuts it after about a second
            code, _ = _code(lambda: list(pb_grpc.ForecasterStub(ch).Stream(_idle_stream(20, done), timeout=30)))
            assert code == grpc.StatusCode.UNAVAILABLE
            _list(ch)  # the client reconnects
    finally:
        done.set()
        srv.stop()


def test_connection_options_carry_every_limit(repo: Path) -> None:
    settings = server_settings(
        repo,
        max_connections=7,
        max_concurrent_streams=8,
        keepalive_time_s=9,
        keepalive_timeout_s=1.5,
        min_client_ping_interval_s=2,
        max_connection_idle_s=3,
        max_connection_age_s=4,
        max_connection_age_grace_s=0.25,
    )
    assert dict(connection_options(settings)) == {
        "grpc.max_allowed_incoming_connections": 7,
        "grpc.max_concurrent_streams": 8,
        "grpc.keepalive_time_ms": 9000,
        "grpc.keepalive_timeout_ms": 1500,
        "grpc.http2.min_ping_interval_without_data_ms": 2000,
        "grpc.max_connection_idle_ms": 3000,
        "grpc.max_connection_age_ms": 4000,
        "grpc.max_connection_age_grace_ms": 250,
    }
    off = dict(connection_options(server_settings(repo, max_connection_idle_s=0, max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in off and "grpc.max_connection_idle_ms" not in off


# --- settings and files: clear errors at start -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"tls_cert_file": Path("c.pem")}, "tls_cert_file is set but tls_key_file is not"),
        ({"tls_key_file": Path("k.pem")}, "tls_key_file is set but tls_cert_file is not"),
        ({"tls_client_ca_file": Path("ca.pem")}, "tls_client_ca_file needs TLS"),
        ({"metrics_tls": True}, "metrics_tls needs TLS"),
        ({"max_connections": 0}, "GATECAST_MAX_CONNECTIONS"),
        ({"max_sessions_per_identity": 0}, "GATECAST_MAX_SESSIONS_PER_IDENTITY"),
        ({"keepalive_time_s": 0}, "GATECAST_KEEPALIVE_TIME_S"),
        ({"max_connection_age_s": -1}, "GATECAST_MAX_CONNECTION_AGE_S"),
    ],
)
def test_security_settings_are_validated(repo: Path, kw: dict[str, Any], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        server_settings(repo, **kw)


def test_tls_files_are_checked_at_start(pki: Pki, repo: Path) -> None:
    with pytest.raises(SettingsError, match=r"GATECAST_TLS_CERT_FILE .* cannot be read"):
        server_credentials(
            server_settings(repo, tls_cert_file=pki.dir / "nope.pem", tls_key_file=pki.dir / "server.key")
        )
    other_cert, _ = _issue("localhost", pki.ca)
    mismatched = pki.write("other.pem", _pem(other_cert))
    with pytest.raises(SettingsError, match=r"do not load .*matching"):
        server_credentials(server_settings(repo, tls_cert_file=mismatched, tls_key_file=pki.dir / "server.key"))
    not_pem = pki.write("garbage.pem", b"not a certificate\n")
    with pytest.raises(SettingsError, match=r"GATECAST_TLS_CLIENT_CA_FILE .* no usable certificate"):
        server_credentials(server_settings(repo, **_tls(pki, tls_client_ca_file=not_pem)))
    assert server_credentials(server_settings(repo, **_tls(pki))) is not None
    assert server_credentials(server_settings(repo)) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (None, "cannot be read"),
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("short-secret\n", "line 1: a token of 12 characters is too easy to guess"),
        (f"{TOKEN_A}\n{TOKEN_B} with a space\n", "line 2: a token is printable ASCII"),
        # found by a hostile test: str.splitlines took U+2028 for a line break, so this started with two tokens
        (f"{TOKEN_A}\u2028{TOKEN_B}\n", "line 1: a token is printable ASCII"),
    ],
    ids=["missing", "empty", "comments only", "short", "space", "line separator"],
)
def test_a_bad_token_file_stops_the_server(tmp_path: Path, repo: Path, text: str | None, says: str) -> None:
    path = tmp_path / "tokens"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SettingsError, match=says) as e:
        TokenFile(path)
    assert "GATECAST_AUTH_TOKENS_FILE" in str(e.value)
    assert "short-secret" not in str(e.value) and TOKEN_B not in str(e.value)  # never echoes a token

    async def start() -> None:
        create_server(server_settings(repo, auth_tokens_file=path))

    with pytest.raises(SettingsError, match=says):  # the server refuses to start with it
        asyncio.run(start())


def test_a_token_is_named_by_its_fingerprint_only() -> None:
    name = token_name(TOKEN_A)
    assert name.startswith("token:") and len(name) == len("token:") + 12 and TOKEN_A not in name
    assert name != token_name(TOKEN_B)


def test_plain_text_beyond_loopback_is_warned_about(repo: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def create(**kw: Any) -> None:
        app = create_server(server_settings(repo, host="0.0.0.0", **kw))
        await app.server.stop(0)

    asyncio.run(create())
    assert any("serving plain text on 0.0.0.0" in r.getMessage() for r in caplog.records)
    caplog.clear()
    asyncio.run(create(**_tls(pki)))
    assert not any("plain text" in r.getMessage() for r in caplog.records)


def test_the_clients_token_variable_does_not_stop_the_server(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATECAST_TOKEN", TOKEN_A)  # gatecast forecast reads it; serve must not take it for a typo
    assert server_settings(repo).auth_tokens_file is None
    monkeypatch.setenv("GATECAST_TOKENS_FILE", "tokens")  # a real typo is still refused, with the setting meant
    with pytest.raises(SettingsError, match="did you mean GATECAST_AUTH_TOKENS_FILE"):
        server_settings(repo)


def test_a_client_ca_bundle_with_utf8_comments_serves_mutual_tls(pki: Pki, repo: Path) -> None:
    """Found by a hostile test: a CA bundle with a UTF-8 comment line (as Mozilla/certifi bundles have) or
    a binary CA file stopped the start with a TypeError traceback. The bundle is read as a file, so text
    around its certificates is skipped; a file with no certificate stops the start with one line."""
    bundle = pki.write("bundle.pem", "# Issuer: CN=gc CA Főtanúsítvány\n".encode() + pki.ca_pem)
    binary = pki.write("binary.pem", b"\xff\xfe\x00\x01" * 64)
    with pytest.raises(SettingsError, match=r"GATECAST_TLS_CLIENT_CA_FILE .* no usable certificate"):
        server_credentials(server_settings(repo, **_tls(pki, tls_client_ca_file=binary)))
    srv = RunningServer(server_settings(repo, **_tls(pki, tls_client_ca_file=bundle)))
    try:
        with _channel(srv, pki.client("client-a")) as ch:
            assert pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
        with _channel(srv, pki.client("rogue", rogue=True)) as ch, pytest.raises(grpc.RpcError) as e:
            pb_grpc.ForecasterStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # a certificate from another CA: no handshake
    finally:
        srv.stop()


def test_the_forecast_command_refuses_a_token_no_header_can_carry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a hostile test: a token file that is not UTF-8 was a UnicodeDecodeError traceback; a token
    with a non-ASCII character (or GATECAST_TOKEN with one) reached grpc as INTERNAL 'Invalid metadata'; an
    empty file sent no token at all; a version above 2**32 - 1 was a protobuf ValueError traceback."""
    from gatecast.cli import main
    from gatecast.client import Client

    csv = tmp_path / "data.csv"
    csv.write_text("time,y\n2024-01-01 00:00,1.0\n")
    cases = {
        "latin1": (b"caf\xe9-token-0123456789abcdef", "not UTF-8"),
        "unicode": ("café-token-0123456789abcdef".encode(), "printable ASCII"),
        "empty": (b"\n", "no token in it"),
    }

    def refused(args: list[str]) -> str:
        """The one line `gatecast forecast` ends with, having exited 2."""
        try:
            code = main(["forecast", "--data", str(csv), "--model", "taylor", "--server", "127.0.0.1:1", *args])
        except SystemExit as e:
            code = e.code  # type: ignore[assignment]
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err and "Traceback" not in "".join(err), (args, code, err)
        return err[-1]

    for name, (data, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert says in refused(["--token-file", str(path)]), name
    assert "version" in refused(["--version", str(2**32)])
    with pytest.raises(ValueError, match=r"version 4294967296: expected 0 .* to 4294967295"):
        Client("127.0.0.1:1").model_info("taylor", 2**32)
