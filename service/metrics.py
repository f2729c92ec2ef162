"""Every Prometheus metric of the server, on a registry passed in (tests get a fresh one).

Every labelled counter a model version can move exists at 0 from the moment the version loads (and the
request counters of unresolved models from the start), so `rate()` sees its first increment: a series
that appears at 1 has no earlier sample to take a rate from, and the first expiry, rejection or error
would be invisible. A version's series go when it is unloaded; the request series of a model name stay
(the servicer keeps their children) and number at most methods x codes per name ever loaded."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

from gatecast.inference import grpc_predict_v2_pb2 as kpb
from gatecast.v1 import forecaster_pb2 as pb

from .errors import ServiceError

# Latency buckets: the Renard R5 series (five per decade, each ~1.6x the last) from 0.1 ms to 10 s. One
# model run takes 0.1-1 ms on CPU and a small request 2-5 ms: each range spans three or four buckets, so
# histogram_quantile (linear inside a bucket) errs by less than one 1.6x step instead of a 1-2-5 step's
# 2-2.5x, and 26 buckets keep the series per label set modest (R10 would double them for 1.26x).
_LATENCY = (*(round(m * 10.0**e, 6) for e in range(-4, 1) for m in (1.0, 1.6, 2.5, 4.0, 6.3)), 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_ROWS = (1, 8, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)


def observe_many(histogram: Any, amounts: list[float]) -> None:
    """`histogram.observe(a)` for every amount, in one pass: the first bucket each falls in (the first bound
    at or above it, as `observe` finds it) counted with numpy, each bucket and the sum moved once.
    prometheus_client's Histogram child keeps such per-bucket counts (cumulated when exported); a child
    without them is observed one amount at a time."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(amounts) < 4 or bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for amount in amounts:
            histogram.observe(amount)
        return
    histogram._raise_if_not_observable()
    total.inc(sum(amounts))
    counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


# the methods counted by name: gatecast's own and the KServe v2 front's (service/kserve.py)
_SERVICES = (pb.DESCRIPTOR.services_by_name["Forecaster"], kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
RPCS = tuple(m.name for service in _SERVICES for m in service.methods)
# the codes the servicer counts: OK, a client that left, and the code of each of our errors
_ERRORS: list[type[ServiceError]] = [ServiceError, *ServiceError.__subclasses__()]
CODES = tuple(sorted({"OK", "CANCELLED", *(e.code.name for e in _ERRORS)}))


def _thread_count() -> float:
    """Threads of the process, onnxruntime's native ones included (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError):
        return float(len(os.listdir("/proc/self/task")))
    return 0.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_{resident,virtual}_memory_bytes, process_cpu_seconds_total, process_open_fds and max_fds,
        # process_start_time_seconds; python_info
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.threads = Gauge("gatecast_process_threads", "Threads of the server process", registry=registry)
        self.threads.set_function(_thread_count)
        self.event_loop = Gauge(
            "gatecast_event_loop",
            "1 for the kind of event loop the server runs on (uvloop, asyncio)",
            ["loop"],
            registry=registry,
        )
        self.requests = Counter(
            "gatecast_requests",
            "Requests (stream messages count one each) by RPC, model and gRPC status code",
            ["rpc", "model", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "gatecast_request_latency_seconds",
            "Time from receiving a request (or stream message) to answering it",
            ["rpc", "model"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "gatecast_queue_wait_seconds",
            "Time a work item waited in the batcher before its model run",
            ["model", "version"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.model_run = Histogram(
            "gatecast_model_run_seconds",
            "Duration of one onnxruntime run",
            ["model", "version"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.batch_size = Histogram(
            "gatecast_batch_size",
            "Work items per dispatched batch",
            ["model", "version"],
            buckets=_BATCH,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "gatecast_batch_rows",
            "Rows (time steps summed over the items) per dispatched batch",
            ["model", "version"],
            buckets=_ROWS,
            registry=registry,
        )
        self.queued_rows = Gauge(
            "gatecast_queued_rows",
            "Rows admitted to the batch queue and not yet run (the queue bound counts these)",
            ["model", "version"],
            registry=registry,
        )
        self.live_sessions = Gauge("gatecast_live_sessions", "Open sessions", ["model", "version"], registry=registry)
        self.sessions_opened = Counter(
            "gatecast_sessions_opened", "Sessions opened", ["model", "version"], registry=registry
        )
        self.sessions_closed = Counter(
            "gatecast_sessions_closed", "Sessions closed by their client", ["model", "version"], registry=registry
        )
        self.sessions_expired = Counter(
            "gatecast_sessions_expired",
            "Sessions removed after the idle timeout",
            ["model", "version"],
            registry=registry,
        )
        self.sessions_rejected = Counter(
            "gatecast_sessions_rejected",
            "OpenSession calls refused because the session pool was full",
            ["model", "version"],
            registry=registry,
        )
        self.sessions_short_history = Counter(
            "gatecast_sessions_short_history",
            "Sessions opened with fewer history rows than the model's context length (early forecasts degraded)",
            ["model", "version"],
            registry=registry,
        )
        self.malformed = Counter(
            "gatecast_malformed_messages",
            "Request messages that could not be decoded, by RPC",
            ["rpc"],
            registry=registry,
        )
        self.batch_steps = Counter(
            "gatecast_batch_steps",
            "Steps of ObserveBatch/StreamBatch messages and Stream messages by how they ran: path=block (claimed "
            "with the message's other steps, or a Stream's with the steps every stream read in the same turn of "
            "the event loop: one model run) or path=single (a retry, an error, a busy session: one at a time)",
            ["rpc", "path"],
            registry=registry,
        )
        self.forecast_path = Counter(
            "gatecast_forecast_path",
            "Forecast and KServe ModelInfer requests by where they ran: path=worker (a forecast worker process) or "
            "path=process (the main process: no worker up, or none holding the version, or the request not readable "
            "without decoding)",
            ["path"],
            registry=registry,
        )
        self.forecast_workers = Gauge(
            "gatecast_forecast_workers",
            "Forecast worker processes running (GATECAST_FORECAST_WORKERS); fewer while one is restarted",
            registry=registry,
        )
        self.forecast_worker_restarts = Counter(
            "gatecast_forecast_worker_restarts",
            "Forecast worker processes that ended while serving (answering UNAVAILABLE what they held) and were "
            "started again",
            registry=registry,
        )
        self.queue_rejected = Counter(
            "gatecast_queue_rejected",
            "Work items refused because the batch queue was full",
            ["model", "version"],
            registry=registry,
        )
        # the session store (service/store.py), when one is configured
        self.store_errors = Counter(
            "gatecast_session_store_errors",
            "Session store (Redis) operations that failed, by operation; sessions carry on locally",
            ["op"],
            registry=registry,
        )
        self.store_writes = Counter(
            "gatecast_session_store_writes",
            "Session blobs sent to the store, by outcome (fenced: another replica holds the session now)",
            ["outcome"],
            registry=registry,
        )
        self.sessions_resumed = Counter(
            "gatecast_sessions_resumed",
            "Sessions taken over from the session store (written by another replica, or before a restart)",
            ["model", "version"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            "gatecast_model_loaded",
            "1 for each loaded model version, labelled with the execution provider actually running it",
            ["model", "version", "provider"],
            registry=registry,
        )

        for rpc in RPCS:
            self.malformed.labels(rpc)
        for rpc in ("ObserveBatch", "StreamBatch", "Stream"):
            for path in ("block", "single"):
                self.batch_steps.labels(rpc, path)
        for path in ("worker", "process"):
            self.forecast_path.labels(path)
        for op in ("write", "read", "close", "ping"):
            self.store_errors.labels(op)
        for outcome in ("written", "stale", "fenced", "closed"):
            self.store_writes.labels(outcome)
        self._add_model("")  # requests naming no loaded model are counted under model=""

    def _add_model(self, name: str) -> None:
        for rpc in RPCS:
            for code in CODES:
                self.requests.labels(rpc, name, code)

    def _version_metrics(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return (
            self.sessions_opened,
            self.sessions_closed,
            self.sessions_expired,
            self.sessions_rejected,
            self.sessions_resumed,
            self.sessions_short_history,
            self.queue_rejected,
            self.live_sessions,
            self.queued_rows,
            self.queue_wait,
            self.model_run,
            self.batch_size,
            self.batch_rows,
        )

    def add_version(self, name: str, version: int, provider: str) -> None:
        """A version was loaded: its series exist at 0 from now on, and it is reported on its provider."""
        self._add_model(name)
        for metric in self._version_metrics():
            metric.labels(name, str(version))
        self.model_loaded.labels(name, str(version), provider).set(1)

    def remove_version(self, name: str, version: int, provider: str) -> None:
        """A version was unloaded (its batcher closed, no session left): its series go with it."""
        for metric in self._version_metrics():
            with contextlib.suppress(KeyError):
                metric.remove(name, str(version))
        with contextlib.suppress(KeyError):
            self.model_loaded.remove(name, str(version), provider)
