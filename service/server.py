"""The composition root: `create_server(settings)` wires repository, sessions, metrics and servicer into
a grpc.aio server bound to its port (0 picks one; the bound port is read back).

Start-up problems a person can fix (a port in use, a missing or unreadable repository, a corrupt session
snapshot) raise `StartupError` (a UserError: the CLI prints one line and exits non-zero). The port is
bound without SO_REUSEPORT, so a second server on a port in use refuses to start instead of silently
taking part of the connections.

TLS, mutual TLS, bearer tokens and the connection limits come from the settings (service.auth,
`connection_options`; docs/readme/security.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from gatecast.errors import UserError
from gatecast.v1 import forecaster_pb2

from . import kserve, loops
from .auth import BearerTokens, TokenFile, metrics_tls, server_credentials
from .forecast_pool import ForecastPool
from .metrics import Metrics
from .repository import Repository, check_repo
from .servicer import ForecasterServicer, TolerantDecoding, add_to_server
from .sessions import SessionTable
from .settings import Settings
from .snapshot import Snapshotter

if TYPE_CHECKING:
    from .store import SessionStore  # imported when a store is configured: redis costs 9 MiB of every server

log = logging.getLogger(__name__)
GC_YOUNG = 20_000
SERVICE_NAME = forecaster_pb2.DESCRIPTOR.services_by_name["Forecaster"].full_name


class StartupError(UserError):
    """The server cannot start: the message names the problem and the setting that controls it."""


def _check_port_free(host: str, port: int, what: str) -> None:
    """Binds and closes a plain socket (SO_REUSEADDR, as servers do, no SO_REUSEPORT) to give a clear error
    for a port in use before gRPC or the HTTP server try."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise StartupError(f"{what}: cannot resolve host {host!r}: {e} (GATECAST_HOST / --host)") from e
    family, type_, proto, _, addr = infos[0]
    with socket.socket(family, type_, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            reason = "is in use (another server?)" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise StartupError(f"{what} {host}:{port} {reason}") from e


def settle_heap() -> None:
    """Start-up's objects (modules, graphs, settings) live as long as the process: frozen out of the cyclic
    collector's sight, so its passes walk only what serving allocates, and the young generation collected
    every GC_YOUNG allocations instead of 700 (a request allocates dozens of tracked objects). Measured
    with benchmarks/throughput.py: about 13% less server CPU per Forecast."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


@dataclass(eq=False)
class App:
    settings: Settings
    server: grpc.aio.Server
    port: int
    repo: Repository
    sessions: SessionTable
    metrics: Metrics
    health: HealthServicer
    snapshots: Snapshotter | None = None
    store: SessionStore | None = None  # issue 12: sessions in Redis too, for another replica to take over
    forecasts: ForecastPool | None = None  # processes that answer unary Forecast requests
    metrics_port: int | None = None
    _metrics_http: Any = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _serving: bool | None = None  # what health says now

    async def start(self) -> None:
        """Metrics port, repository, models, session snapshot, then the gRPC port starts accepting. On a
        StartupError everything opened so far is closed again."""
        try:
            await self._start()
        except BaseException:
            await self._close_opened()
            raise

    async def _start(self) -> None:
        s = self.settings
        if s.metrics_port is not None:
            _check_port_free(s.host, s.metrics_port, "metrics port (GATECAST_METRICS_PORT / --metrics-port)")
            try:
                httpd, _ = start_http_server(s.metrics_port, s.host, self.metrics.registry, **metrics_tls(s))
            except OSError as e:
                raise StartupError(f"metrics port {s.host}:{s.metrics_port} cannot be bound: {e.strerror or e}") from e
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
        check_repo(s.repo)
        saved = self.snapshots.read() if self.snapshots is not None else []  # a corrupt file stops us here
        try:
            await self.repo.refresh()
        except OSError as e:
            raise StartupError(f"model repository {s.repo} cannot be read: {e.strerror or e}") from e
        if not self.repo.versions():
            log.warning("no model found under %s; health is NOT_SERVING until one loads", s.repo)
        if self.snapshots is not None:
            if self.store is not None and saved:  # the store is as new as any step answered: sessions come from it
                log.info("%d session(s) in %s left to the session store", len(saved), self.snapshots.path)
                saved = []
            self.snapshots.restore(saved)
            try:
                await self.snapshots.save()  # fails now, not at the first SIGTERM, when the path is not writable
            except OSError as e:
                where = f"session snapshot (GATECAST_SNAPSHOT_PATH) {self.snapshots.path}"
                raise StartupError(f"{where} cannot be written: {e.strerror or e}") from e
        if self.store is not None:
            await self.store.start()
        if self.forecasts is not None:  # Forecasts run here until a worker holds their version
            self.forecasts.start(self.repo.versions())
        await self.server.start()
        settle_heap()
        await self._update_health()
        loop = asyncio.get_running_loop()
        self.metrics.event_loop.labels(loops.kind(loop)).set(1)
        self._tasks = [
            loop.create_task(self._every(s.repo_poll_s, self._poll_repo), name="repo-poll"),
            loop.create_task(self._every(s.session_sweep_s, self._sweep), name="session-sweep"),
        ]
        if self.snapshots is not None:
            self._tasks.append(
                loop.create_task(self._every(s.snapshot_interval_s, self._snapshot), name="session-snapshot")
            )
        log.info(
            "gatecast listening on %s:%d (metrics on %s), %d model version(s), event loop %s",
            self.settings.host,
            self.port,
            self.metrics_port,
            len(self.repo.versions()),
            loops.kind(loop),
        )

    async def _update_health(self) -> None:
        """SERVING while at least one model version is loaded, NOT_SERVING otherwise."""
        serving = bool(self.repo.versions())
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        await self.health.set(kserve.SERVICE_NAME, status)

    async def _poll_repo(self) -> None:
        try:
            await self.repo.refresh()
        except OSError as e:
            log.error("cannot scan the model repository %s: %s; serving what is loaded", self.settings.repo, e)
        if self.forecasts is not None:
            self.forecasts.follow(self.repo.versions())
        await self._update_health()

    async def _sweep(self) -> None:
        self.sessions.expire()

    async def _snapshot(self) -> None:
        assert self.snapshots is not None
        await self.snapshots.save()

    @staticmethod
    async def _every(seconds: float, job: Any) -> None:
        """Runs `job` every `seconds`. A failure is logged with its traceback once; the same failure again
        (a snapshot folder gone, say) is one line each time, and the first success after says so."""
        name = getattr(job, "__name__", job)
        last: str | None = None
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as e:
                failure = f"{type(e).__name__}: {e}"
                if failure == last:
                    log.error("background job %s failed again: %s", name, failure)
                else:
                    log.exception("background job %s failed", name)
                last = failure
            else:
                if last is not None:
                    log.info("background job %s succeeded again", name)
                last = None

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, lets in-flight calls finish (up to the grace period), drains the batchers, then
        writes every session to the snapshot (when one is configured). Raises OSError if that write fails."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self._cancel_tasks()
        await self.server.stop(grace)
        if self.forecasts is not None:  # every Forecast call has ended: the workers have nothing left
            await self.forecasts.close()
        await self.repo.close()
        for _ in range(3):  # let the drained steps' done callbacks release their sessions
            await asyncio.sleep(0)
        if self.store is not None:
            await self.store.close()  # what is pending is written first
        try:
            if self.snapshots is not None:
                n = await self.snapshots.save()
                log.info("wrote %d session(s) to %s", n, self.snapshots.path)
        finally:
            self._close_metrics()
            log.info("gatecast stopped; %d session(s) were live", len(self.sessions))

    async def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    def _close_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def _close_opened(self) -> None:
        """After a failed start: nothing is saved (the snapshot on disk stays as it was)."""
        await self._cancel_tasks()
        await self.server.stop(0)
        if self.forecasts is not None:
            await self.forecasts.close()
        await self.repo.close()
        if self.store is not None:
            await self.store.close()
        self._close_metrics()


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """The connection limits as grpc core channel arguments. Beyond max_concurrent_streams a client's calls
    wait on its side; beyond max_connections a new connection is closed before its handshake (the client
    sees UNAVAILABLE and retries with backoff)."""

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    options = [
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_client_ping_interval_s)),
    ]
    if settings.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)))
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)))
    return options


class GenericOnly:
    """Hands a service's handlers to the server as generic handlers only. grpc.aio serves each method
    registered with `add_registered_method_handlers` (what generated code does) with a request task of its
    own, and its main loop waits on all of those tasks (asyncio.wait) for every incoming call: with the ~20
    methods of Forecaster, KServe and health that was about a fifth of the event loop's time per Forecast."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, name: str, handlers: Any) -> None:
        pass  # the generic handler added beside them serves these methods


def create_server(settings: Settings, registry: CollectorRegistry | None = None) -> App:
    _check_port_free(settings.host, settings.port, "gRPC port (GATECAST_PORT / --port)")
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    repo = Repository(settings, metrics)
    sessions = SessionTable(metrics, settings.session_idle_s, settings.max_sessions_per_identity)
    store: SessionStore | None = None
    if settings.session_store_url is not None:
        from .store import SessionStore

        store = SessionStore(settings, sessions, repo, metrics)
    credentials = server_credentials(settings)  # files checked before anything is bound
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_tokens_file is not None:
        interceptors.append(BearerTokens(TokenFile(settings.auth_tokens_file)))  # first: refuse before decoding
    limit = settings.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on this port must fail, not share it
            *connection_options(settings),
        ],
        interceptors=[*interceptors, TolerantDecoding()],  # TolerantDecoding: malformed health/reflection requests
    )
    generic = GenericOnly(server)
    workers = settings.forecast_worker_count()
    forecasts = ForecastPool(settings, metrics, workers) if workers else None
    servicer = ForecasterServicer(settings, repo, sessions, metrics, forecasts)
    add_to_server(servicer, generic)  # malformed: INVALID_ARGUMENT
    kserve.add_to_server(kserve.KServeServicer(settings, repo, metrics, forecasts), generic)  # KServe v2, same engine
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, generic)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            kserve.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        address = f"{settings.host}:{settings.port}"
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        port = 0
        cause: Exception | None = e
    else:
        cause = None
    if port == 0:
        raise StartupError(
            f"gRPC port (GATECAST_PORT / --port) {settings.host}:{settings.port} cannot be bound"
        ) from cause
    if credentials is None and settings.host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "serving plain text on %s: set GATECAST_TLS_CERT_FILE and GATECAST_TLS_KEY_FILE (docs: security)",
            settings.host,
        )
    snapshots = Snapshotter(settings.snapshot_path, sessions, repo) if settings.snapshot_path is not None else None
    return App(settings, server, port, repo, sessions, metrics, health, snapshots, store=store, forecasts=forecasts)
