"""Every Prometheus metric of the server, on a registry passed in (tests get a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_ROWS = (1, 8, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        self.queue_rejected = Counter(
            "gatecast_queue_rejected",
            "Work items refused because the batch queue was full",
            ["model", "version"],
            registry=registry,
        )
        self.model_loaded = Gauge(
            "gatecast_model_loaded",
            "1 for each loaded model version, labelled with the execution provider actually running it",
            ["model", "version", "provider"],
            registry=registry,
        )
