"""Server settings: one pydantic-settings class, from GATECAST_* variables over an optional TOML file."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvParseError

from gatecast.errors import UserError

from .loops import LoopChoice, uvloop_problem


class SettingsError(UserError):
    """A setting is invalid; the server does not start."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATECAST_", extra="forbid")

    repo: Path = Field(Path("models"), description="model repository: <repo>/<name>/<version>/")
    host: str = Field("127.0.0.1", description="address the gRPC and metrics ports bind; 0.0.0.0: every interface")
    port: int = Field(8500, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int | None = Field(8510, ge=0, le=65535, description="Prometheus /metrics port; unset: off")
    repo_poll_s: float = Field(5.0, gt=0, description="how often the repository is rescanned")
    # runtime
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference; the one actually used is reported",
    )
    intra_op_threads: int = Field(
        1, ge=0, description="onnxruntime intra-op threads; 0: onnxruntime's choice (1: least CPU per forecast)"
    )
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime inter-op threads; 0: onnxruntime's choice")
    allow_spinning: bool = Field(False, description="onnxruntime thread spin-wait (burns an idle core)")
    event_loop: LoopChoice = Field(
        "auto",
        description="the event loop of the server and its forecast workers: uvloop (less CPU per call), asyncio "
        "(the standard one); auto: uvloop when installed",
    )
    # batching
    max_batch_size: int = Field(
        512,
        ge=1,
        description="items in one model run (a Forecast series, a session step); a batch closes when full "
        "(max_batch_rows bounds it too: 21 windows of 96 rows)",
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        description="a batch closes when its oldest request has waited this long (waited in whole milliseconds, "
        "rounded up, on either event loop); 0: once the worker is free (what arrived during a run forms the next "
        "batch)",
    )
    forecast_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="processes beside the main one that run unary Forecast and KServe ModelInfer requests "
        "(sessions stay in the main process); 0: they run in the main process; unset: 1 on a machine with 2 or "
        "more cores, else 0",
    )
    forecast_worker_stall_s: float = Field(
        30.0,
        gt=0,
        description="a forecast worker that holds requests and answers none of them for this long is killed (its "
        "requests answer UNAVAILABLE) and started again",
    )
    max_queue_size: int = Field(
        4096, ge=1, description="requests queued per model version (a Forecast counts one) before RESOURCE_EXHAUSTED"
    )
    # sessions
    max_sessions: int = Field(100_000, ge=1, description="live sessions per model version")
    initial_session_slots: int = Field(
        1024, ge=1, description="state slots allocated per model version at load; the pool grows up to max_sessions"
    )
    session_idle_s: float = Field(600.0, gt=0, description="a session idle this long expires")
    session_sweep_s: float = Field(5.0, gt=0, description="how often idle sessions are looked for")
    # limits on what a client may send
    max_rows: int = Field(100_000, ge=1, description="rows in one series or one observation")
    max_series: int = Field(4096, ge=1, description="series in one Forecast request")
    max_request_rows: int = Field(
        1_000_000, ge=1, description="rows in one request summed over its series (at most half of max_queue_rows)"
    )
    max_queue_rows: int = Field(4_000_000, ge=2, description="rows queued per model version before RESOURCE_EXHAUSTED")
    max_batch_rows: int = Field(2048, ge=1, description="rows (time steps summed over a batch) in one model run")
    chunk_rows: int = Field(
        512, ge=1, description="a longer series or observation runs in pieces this long, interleaved with others"
    )
    max_stream_inflight: int = Field(256, ge=1, description="messages one Stream may have read and not yet answered")
    max_batch_steps: int = Field(1024, ge=1, description="steps in one ObserveBatch/StreamBatch message")
    max_message_mb: int = Field(64, ge=1, description="largest gRPC message received or sent, in MiB")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM, SIGINT or SIGHUP: time in-flight work has to finish"
    )
    # session snapshots (docs/snapshot.md): written on SIGTERM/SIGHUP and every snapshot_interval_s
    snapshot_path: Path | None = Field(None, description="session snapshot file; unset: sessions die with the process")
    snapshot_interval_s: float = Field(30.0, gt=0, description="how often sessions are snapshotted while serving")
    # session store (docs/readme/sessions-store.md): sessions kept in Redis, so another replica can take one over
    session_store_url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://", description="redis://host:port/db of the session store; unset: off"
    )
    session_store_every: int = Field(
        1, ge=1, description="a session is written after every step whose sequence number is a multiple of this"
    )
    session_store_ttl_s: float | None = Field(
        None, gt=0, description="a session's key lives this long after its last write; unset: session_idle_s"
    )
    # security (docs/readme/security.md): TLS, client certificates, bearer tokens
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the gRPC port; unset: plain text")
    tls_key_file: Path | None = Field(None, description="unencrypted PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA certificates: clients must present a certificate they signed (mutual TLS)"
    )
    metrics_tls: bool = Field(False, description="/metrics over TLS with the gRPC port's certificate (and client CA)")
    auth_tokens_file: Path | None = Field(
        None, description="bearer tokens, one per line, re-read on change; every method but health needs one"
    )
    max_sessions_per_identity: int = Field(
        10_000, ge=1, description="live sessions one client identity (certificate subject or token) may hold"
    )
    # connections (grpc core channel arguments; 0 turns the age and idle limits off)
    max_connections: int = Field(1024, ge=1, description="open client connections; more are closed at once")
    max_concurrent_streams: int = Field(1024, ge=1, description="calls in flight on one connection; more wait")
    keepalive_time_s: float = Field(60.0, gt=0, le=86_400, description="ping a connection silent this long")
    keepalive_timeout_s: float = Field(20.0, gt=0, le=86_400, description="close it when the ping is not answered")
    min_client_ping_interval_s: float = Field(
        10.0, gt=0, le=86_400, description="a client pinging more often is sent GOAWAY (too_many_pings)"
    )
    max_connection_idle_s: float = Field(900.0, ge=0, le=86_400, description="close a connection with no call")
    max_connection_age_s: float = Field(3600.0, ge=0, le=86_400, description="close any connection this old")
    max_connection_age_grace_s: float = Field(
        300.0, ge=0, le=86_400, description="calls still running when max_connection_age_s ends get this long"
    )

    def forecast_worker_count(self) -> int:
        """forecast_workers, or its default for this machine's cores (those this process may run on)."""
        if self.forecast_workers is not None:
            return self.forecast_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 1 if cores >= 2 else 0

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.providers:
            raise ValueError("providers must name at least one onnxruntime execution provider")
        tls = {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file}
        if None in tls.values() and any(tls.values()):
            given, missing = sorted(tls, key=lambda k: tls[k] is None)
            raise ValueError(
                f"{given} is set but {missing} is not: TLS needs the certificate and its key "
                f"(GATECAST_{missing.upper()})"
            )
        for needs_tls in ("tls_client_ca_file", "metrics_tls"):
            if getattr(self, needs_tls) and self.tls_cert_file is None:
                raise ValueError(
                    f"{needs_tls} needs TLS: set tls_cert_file and tls_key_file "
                    "(GATECAST_TLS_CERT_FILE, GATECAST_TLS_KEY_FILE) too"
                )
        if self.event_loop == "uvloop" and (problem := uvloop_problem()):
            raise ValueError(
                f"event_loop is uvloop but {problem}: pip install uvloop, or set event_loop to auto or asyncio "
                "(GATECAST_EVENT_LOOP)"
            )
        if self.initial_session_slots > self.max_sessions:
            object.__setattr__(self, "initial_session_slots", self.max_sessions)
        return self


def load_settings(file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < TOML file < GATECAST_* environment < explicit overrides (CLI flags)."""
    values: dict[str, Any] = {}
    _refuse_unknown_env()
    if file is not None:
        if not file.is_file():
            raise SettingsError(f"settings file {file}: no such file")
        try:
            values = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"settings file {file}: {e}") from e
        except UnicodeDecodeError as e:  # TOML is UTF-8
            raise SettingsError(f"settings file {file}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from e
        except OSError as e:
            raise SettingsError(f"settings file {file}: cannot be read: {e.strerror or e}") from e
    try:
        env = Settings()  # reads GATECAST_*; validates them on their own
        merged = {**values, **env.model_dump(exclude_unset=True)}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return Settings.model_validate(merged)
    except EnvParseError as e:  # a list or dict variable that is not JSON
        raise SettingsError(
            f"invalid settings: {e} (GATECAST_* lists are JSON, e.g. '[\"CPUExecutionProvider\"]')"
        ) from e
    except ValidationError as e:
        problems = "; ".join(
            f"{'GATECAST_' + str(err['loc'][0]).upper() if err['loc'] else 'settings'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in e.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from e


CLIENT_ENV = {"GATECAST_TOKEN"}  # read by the client (gatecast forecast): not a typo when the shell also serves


def _refuse_unknown_env() -> None:
    """A GATECAST_* variable that names no setting is a typo: refuse it rather than run on a default."""
    prefix = "GATECAST_"
    known = {prefix + name.upper() for name in Settings.model_fields}
    ours = known | CLIENT_ENV
    unknown = sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper() not in ours)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.upper(), known, n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        listing = "" if all("did you mean" in h for h in hints) else f"; known: {', '.join(sorted(known))}"
        raise SettingsError(f"unknown setting(s) in the environment: {', '.join(hints)}{listing}")
