"""The composition root: `create_server(settings)` wires repository, sessions, metrics and servicer into
a grpc.aio server bound to its port (0 picks one; the bound port is read back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from gatecast.v1 import forecaster_pb2

from .metrics import Metrics
from .repository import Repository
from .servicer import ForecasterServicer, add_to_server
from .sessions import SessionTable
from .settings import Settings

log = logging.getLogger(__name__)
SERVICE_NAME = forecaster_pb2.DESCRIPTOR.services_by_name["Forecaster"].full_name


@dataclass(eq=False)
class App:
    settings: Settings
    server: grpc.aio.Server
    port: int
    repo: Repository
    sessions: SessionTable
    metrics: Metrics
    health: HealthServicer
    metrics_port: int | None = None
    _metrics_http: Any = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.repo.refresh()
        if not self.repo.versions():
            log.warning("no model found under %s; serving none until one appears", self.settings.repo)
        if self.settings.metrics_port is not None:
            httpd, _ = start_http_server(self.settings.metrics_port, self.settings.host, self.metrics.registry)
            self._metrics_http = httpd
            self.metrics_port = httpd.server_port
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(self.settings.repo_poll_s, self.repo.refresh), name="repo-poll"),
            loop.create_task(self._every(self.settings.session_sweep_s, self._sweep), name="session-sweep"),
        ]
        log.info(
            "gatecast listening on %s:%d (metrics on %s), %d model version(s)",
            self.settings.host,
            self.port,
            self.metrics_port,
            len(self.repo.versions()),
        )

    async def _sweep(self) -> None:
        self.sessions.expire()

    @staticmethod
    async def _every(seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("background job %s failed", getattr(job, "__name__", job))

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, lets in-flight calls finish (up to the grace period), drains the batchers."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.server.stop(grace)
        await self.repo.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("gatecast stopped; %d session(s) were live", len(self.sessions))


def create_server(settings: Settings, registry: CollectorRegistry | None = None) -> App:
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    repo = Repository(settings, metrics)
    sessions = SessionTable(metrics, settings.session_idle_s)
    limit = settings.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    add_to_server(ForecasterServicer(settings, repo, sessions, metrics), server)  # malformed requests: INVALID_ARGUMENT
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    return App(settings, server, port, repo, sessions, metrics, health)
