"""The Python client of the gatecast API: forecasts and streaming sessions, blocking (`Client`) or asyncio
(`AsyncClient`).

    with Client("localhost:8500") as client:
        frame = client.forecast(history, "taylor")        # history: a frame with a time index
        with client.session("taylor", history=history) as session:
            frame = session.observe(new_rows)
        a, b = client.session("taylor").open(), client.session("taylor").open()
        frames = client.observe_many([(a, rows_a), (b, rows_b)])  # one ObserveBatch call
        with client.stream_batch() as stream:                     # one StreamBatch call, a message each
            frames = stream.observe_many([(a, rows_a), (b, rows_b)])

Forecasts come back as pandas frames indexed by the forecast timestamps: the input's last timestamp plus
1..horizon model steps (the model's step when it has one, else the input index's frequency; an integer index
counts on by one; a plain array gives steps 1..horizon). A quantile model adds a `<target>_q<level>` column
per target and level. Calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED are retried with backoff by
gRPC itself (a retry policy in the channel's service config), which is safe for every unary method: a session
step carries its sequence number, and the server answers a repeated number with the stored answer instead of
applying the rows twice. A step whose outcome stayed unknown (the retries ran out) is resent, with its
number, before the session's next step. A session's calls carry its id as metadata `x-gatecast-session` (the
client proposes the id on OpenSession), which a proxy hashes to send them all to one replica. pandas is
needed (`pip install 'gatecast[client]'`); the server is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import grpc.aio
import numpy as np

from gatecast import SESSION_HEADER
from gatecast.errors import UserError
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import pandas as pd


SERVICE = pb.DESCRIPTOR.services_by_name["Forecaster"]
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# A step that failed with one of these may have been applied: it is resent, same number, before the next.
OUTCOME_UNKNOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class ClientError(UserError):
    """A call failed; `code` is its gRPC status (None for an error found before calling)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Retry:
    """gRPC's retry policy for every unary method: attempts in all (gRPC caps them at 5), and the backoff
    before attempt n, a random time up to min(initial * multiplier**(n-1), max)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    codes: tuple[str, ...] = RETRYABLE


def service_config(retry: Retry | None) -> str:
    """The channel's service config JSON: the retry policy on each unary method of the Forecaster (a stream
    is not replayed: its steps are answered one by one)."""
    if retry is None:
        return json.dumps({"methodConfig": []})
    names = [
        {"service": SERVICE.full_name, "method": m.name}
        for m in SERVICE.methods
        if not m.client_streaming and not m.server_streaming
    ]
    policy = {
        "maxAttempts": retry.max_attempts,
        "initialBackoff": f"{retry.initial_backoff_s}s",
        "maxBackoff": f"{retry.max_backoff_s}s",
        "backoffMultiplier": retry.multiplier,
        "retryableStatusCodes": list(retry.codes),
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass
class _Channel:
    """What both clients open a channel with."""

    target: str
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    private_key: bytes | str | Path | None = None
    certificate_chain: bytes | str | Path | None = None
    token: str | None = None
    timeout: float | None = 10.0
    retry: Retry | None = field(default_factory=Retry)
    max_message_mb: int = 64

    def options(self) -> list[tuple[str, Any]]:
        limit = self.max_message_mb * 1024 * 1024
        return [
            ("grpc.service_config", service_config(self.retry)),
            ("grpc.enable_retries", int(self.retry is not None)),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS when asked for or when any certificate is given; a client certificate makes it mutual."""
        files = (self.root_certificates, self.private_key, self.certificate_chain)
        if not self.tls and all(f is None for f in files):
            return None
        root, key, chain = (_pem(f) for f in files)
        if (key is None) != (chain is None):
            raise ClientError("mutual TLS needs both private_key and certificate_chain")
        return grpc.ssl_channel_credentials(root, key, chain)

    def metadata(self, session: str = "") -> tuple[tuple[str, str], ...]:
        """The token, and a session's id for a proxy to route the call by (deploy/haproxy.cfg)."""
        token = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        return (*token, (SESSION_HEADER, session)) if session else token


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ClientError(f"{value}: cannot read the PEM file: {e.strerror or e}") from None


def _error(target: str, e: grpc.RpcError) -> ClientError:
    code = e.code()  # type: ignore[attr-defined]
    return ClientError(f"{target}: {code.name}: {e.details()}", code)  # type: ignore[attr-defined]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _step_error(target: str, session: str, sequence: int, error: pb.StreamError) -> ClientError:
    """A batch step's own error (the other steps of its call were answered)."""
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return ClientError(f"{target}: session {session} step {sequence}: {code.name}: {error.message}", code)


# --- what goes out and what comes back -----------------------------------------------------------------


def _matrix(x: np.ndarray) -> pb.Matrix:
    return pb.Matrix(rows=x.shape[0], cols=x.shape[1], values=x.ravel().tolist())


def _array(m: pb.Matrix) -> np.ndarray:
    return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)


def _rows(data: Any, info: pb.ModelInfo) -> tuple[np.ndarray, Any]:
    """A frame's feature columns (by name) or an array's columns as float32 [rows, features], and the index
    (None for an array)."""
    features = list(info.features)
    if hasattr(data, "columns"):  # a pandas frame
        missing = [c for c in features if c not in data.columns]
        if missing:
            raise ClientError(
                f"no column(s) {missing}: model {info.name} needs {features}, the frame has {list(data.columns)}"
            )
        try:
            return np.ascontiguousarray(data[features].to_numpy(dtype=np.float32)), data.index
        except (TypeError, ValueError):
            raise ClientError(_not_numbers(data, features)) from None
    x = np.asarray(data, dtype=np.float32)
    if x.ndim == 1 and len(features) == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != len(features):
        raise ClientError(f"an array of shape {x.shape}: model {info.name} needs [rows, {len(features)}] ({features})")
    return np.ascontiguousarray(x), None


def _not_numbers(data: pd.DataFrame, columns: list[str]) -> str:
    import pandas as pd

    for c in columns:
        bad = data[c][pd.to_numeric(data[c], errors="coerce").isna() & data[c].notna()]
        if len(bad):
            return f"column {c!r} at {bad.index[0]}: {bad.iloc[0]!r} is not a number"
    return f"columns {columns} are not all numbers"


def _offset(index: Any, step: str) -> Any:
    """The time step of a datetime index: the model's when it has one, else the index's frequency (inferred
    from its last rows; two rows give their difference). None when none can be told."""
    import pandas as pd

    if step:
        return pd.tseries.frequencies.to_offset(step)
    if not isinstance(index, pd.DatetimeIndex):
        return None
    if index.freq is not None:
        return index.freq
    tail = index[-min(len(index), 64) :]
    if len(tail) >= 3 and (inferred := pd.infer_freq(tail)):
        return pd.tseries.frequencies.to_offset(inferred)
    if len(tail) == 2 and tail[1] > tail[0]:
        return pd.tseries.frequencies.to_offset(tail[1] - tail[0])
    return None


def _future_index(index: Any, offset: Any, horizon: int) -> pd.Index:
    """The forecast's timestamps: the input's last time plus 1..horizon steps; an integer index counts on
    from its last value, anything else (an array) counts steps from 1."""
    import pandas as pd

    if isinstance(index, pd.DatetimeIndex) and len(index):
        if offset is None:
            raise ClientError(
                "cannot tell the forecast's timestamps: the model has no time step and the index has no regular "
                "frequency; give the frame's index a freq"
            )
        return pd.DatetimeIndex([index[-1] + offset * k for k in range(1, horizon + 1)], name=index.name or "timestamp")
    if index is not None and len(index) and pd.api.types.is_integer_dtype(index.dtype):
        return pd.RangeIndex(int(index[-1]) + 1, int(index[-1]) + horizon + 1, name=index.name or "step")
    return pd.RangeIndex(1, horizon + 1, name="step")


def _frame(
    info: pb.ModelInfo, forecast: pb.Matrix, quantiles: pb.Matrix | None, index: Any, offset: Any = None
) -> pd.DataFrame:
    """Point columns named by target, then `<target>_q<level>` for a quantile model; `offset` is the time
    step when the index alone cannot tell it."""
    import pandas as pd

    y = _array(forecast)
    columns = {t: y[:, i] for i, t in enumerate(info.targets)}
    if quantiles is not None and quantiles.rows and info.quantiles:
        q = _array(quantiles).reshape(y.shape[0], len(info.targets), len(info.quantiles))  # target-major
        for i, t in enumerate(info.targets):
            for j, level in enumerate(info.quantiles):
                columns[f"{t}_q{level:g}"] = q[:, i, j]
    timed = _offset(index, info.step) or offset
    frame = pd.DataFrame(columns, index=_future_index(index, timed, y.shape[0]))
    frame.attrs.update(model=info.name, version=info.version)
    return frame


def _values(info: pb.ModelInfo, forecast: pb.Matrix, quantiles: pb.Matrix | None) -> np.ndarray:
    """What `_frame` holds, as one array [horizon, columns] in its column order (no pandas)."""
    y = _array(forecast)
    if quantiles is None or not quantiles.rows or not info.quantiles:
        return y
    return np.concatenate([y, _array(quantiles).reshape(y.shape[0], -1)], axis=1)  # target-major, as the frame


MAX_VERSION = 2**32 - 1  # the API's version field is a uint32


def _version(version: int) -> int:
    """A model version as the API carries it, refused here with its range rather than by protobuf."""
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"version {version}: expected 0 (the server's default) to {MAX_VERSION}")
    return version


def _forecast_request(model: str, version: int, series: Sequence[np.ndarray]) -> pb.ForecastRequest:
    return pb.ForecastRequest(model=model, version=version, series=[_matrix(x) for x in series])


def _series(series: Sequence[Any], info: pb.ModelInfo, rows: int | None) -> list[tuple[np.ndarray, Any]]:
    """Each series' last `rows` rows (default: the model's context) and their index."""
    out = []
    for s in series:
        x, index = _rows(s, info)
        n = rows or info.context_length
        out.append((x[-n:], None if index is None else index[-n:]))
    return out


class _ClientBase:
    """What both clients hold: the channel (made by `_grpc`, grpc or grpc.aio, whose constructors agree),
    the stub and the models looked up."""

    _grpc: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        token: str | None = None,
        timeout: float | None = 10.0,
        retry: Retry | None = Retry(),
        max_message_mb: int = 64,
    ) -> None:
        self._conf = _Channel(
            target, tls, root_certificates, private_key, certificate_chain, token, timeout, retry, max_message_mb
        )
        creds = self._conf.credentials()
        options = self._conf.options()
        self.channel = (
            self._grpc.secure_channel(target, creds, options) if creds else self._grpc.insecure_channel(target, options)
        )
        self.stub = pb_grpc.ForecasterStub(self.channel)
        self._info: dict[tuple[str, int], pb.ModelInfo] = {}


# --- the blocking client ---------------------------------------------------------------------------------


class Client(_ClientBase):
    """A channel to one server. `timeout` is each call's deadline in seconds, retries included; `token` is
    sent as `authorization: Bearer <token>`; `tls`, or any certificate, makes the channel TLS (with
    `private_key` and `certificate_chain`: mutual TLS); `retry=None` turns the retry policy off."""

    def _call(self, method: str, request: Any, session: str = "") -> Any:
        try:
            metadata = self._conf.metadata(session)
            return getattr(self.stub, method)(request, timeout=self._conf.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise _error(self._conf.target, e) from None

    def model_info(self, model: str, version: int = 0, *, refresh: bool = False) -> pb.ModelInfo:
        """GetModel, remembered per (model, version) until `refresh`."""
        _version(version)
        if refresh or (model, version) not in self._info:
            self._info[model, version] = self._call("GetModel", pb.GetModelRequest(name=model, version=version))
        return self._info[model, version]

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def forecast(self, data: Any, model: str, version: int = 0, *, rows: int | None = None) -> pd.DataFrame:
        """One series' forecast: `data` a frame (its feature columns by name, a time index) or an array
        [rows, features]; the last `rows` rows are sent (default: the model's context length)."""
        return self.forecast_many([data], model, version, rows=rows)[0]

    def forecast_many(
        self, series: Sequence[Any], model: str, version: int = 0, *, rows: int | None = None
    ) -> list[pd.DataFrame]:
        """Many series in one request, each from its own history; frames in the same order."""
        info = self.model_info(model, version)
        xs = _series(series, info, rows)
        reply = self._call("Forecast", _forecast_request(model, version, [x for x, _ in xs]))
        if reply.version != info.version:  # the default version changed since it was looked up
            info = self.model_info(model, version, refresh=True)
        qs = list(reply.quantile_forecasts) or [None] * len(xs)
        return [_frame(info, f, q, index) for f, q, (_, index) in zip(reply.forecasts, qs, xs, strict=True)]

    def session(self, model: str, version: int = 0, *, history: Any = None) -> Session:
        """A streaming session, opened on entering `with` (or at its first step) and closed on leaving it."""
        return Session(self, model, version, history)

    def observe_many(self, steps: Sequence[tuple[Session, Any]], *, arrays: bool = False) -> list[Any]:
        """New rows for many sessions of this client in one ObserveBatch call (what a gateway sends): in
        order, each session's forecast after its rows, or its step's own error as a ClientError (a bad step
        never fails the others). Each session numbers its step and resends an unanswered one first, as
        `observe` does. Raises ClientError when the call fails as a whole (each step then stands as
        `observe` would leave it). Sessions not yet open are opened first. `arrays`: each forecast as an array
        [horizon, columns], the frame's values in its column order, without building frames (most of the
        client's time: about a quarter of the CPU per step)."""
        _own(self, steps)
        for session, _ in steps:
            session.open()
        many = _ObserveMany(self._conf.target, steps, arrays)
        for request in many.messages():
            try:
                reply = self._call("ObserveBatch", request)
            except ClientError as e:
                many.failed(e)
                raise
            except BaseException:  # the caller gave up: the steps may have been applied
                many.failed(_interrupted(self._conf.target))
                raise
            many.answered(reply)
        return many.out()

    def stream_batch(self, *, route: str = "") -> BatchStream:
        """One StreamBatch call, opened at its first message: `observe_many` on it sends one message and
        waits for its answer (see BatchStream). `route`: a session id whose replica a proxy should send the
        stream to (the stream goes to one replica)."""
        return BatchStream(self, route)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


S = TypeVar("S")


class _SessionState(Generic[S]):
    """What both session flavours keep: the id, the model, the next sequence number, the unanswered step."""

    def __init__(self, client: S, model: str, version: int, history: Any) -> None:
        self.client = client
        self.model = model
        self.version = _version(version)
        self.history = history
        self.id = ""
        # proposed on OpenSession and sent with every call, so a proxy routes them all to one replica
        self.proposed = secrets.token_hex(16)
        self.info: pb.ModelInfo | None = None
        self.forecast: pd.DataFrame | None = None  # after a history
        self.next_sequence = 1
        self._pending: tuple[int, np.ndarray] | None = None
        self._opening_lock = threading.Lock()  # Session: one open at a time
        self._opening: asyncio.Future[None] | None = None  # AsyncSession: the open under way
        self._last_index: Any = None  # the newest rows' index, from which forecasts are timed
        self._offset: Any = None  # the time step seen in an earlier frame, for a step of one row

    def _open_request(self, info: pb.ModelInfo) -> pb.OpenSessionRequest:
        self.info = info
        req = pb.OpenSessionRequest(model=self.model, version=self.version)
        if self.history is not None:
            x, _ = self._step(self.history)
            req.history.CopyFrom(_matrix(x))
        return req

    def _opened(self, reply: pb.OpenSessionResponse) -> None:
        self.id, self.version, self.next_sequence = reply.session_id, reply.version, reply.next_sequence
        assert self.info is not None
        if reply.HasField("forecast"):
            self.forecast = self._answer(reply)

    def _step(self, rows: Any) -> tuple[np.ndarray, Any]:
        """New rows as an array; a frame's index times the forecasts (an array's forecasts count steps)."""
        assert self.info is not None
        x, index = _rows(rows, self.info)
        self._last_index = index
        self._offset = _offset(index, self.info.step) or self._offset
        return x, index

    def _request(self, seq: int, x: np.ndarray) -> pb.ObserveRequest:
        return pb.ObserveRequest(session_id=self.id, sequence=seq, rows=_matrix(x))

    def _sent(self, seq: int, x: np.ndarray, error: ClientError | None, whole: bool = False) -> None:
        """Bookkeeping after a step: the next number, or the step to resend when its outcome is unknown. A
        step's own refusal of a resend says the step was never applied (the same rows were refused before):
        it is not resent again; a refusal of a `whole` call or message of steps says nothing of that."""
        if error is None:
            self._pending = None
            self.next_sequence = seq + 1
        elif error.code in OUTCOME_UNKNOWN:
            self._pending = (seq, x)
        elif not whole and self._pending is not None and self._pending[0] == seq:
            self._pending = None

    def _answer(
        self, reply: pb.ObserveResponse | pb.OpenSessionResponse | pb.StreamResponse, arrays: bool = False
    ) -> Any:
        """The forecast as a timed frame, or (`arrays`) as that frame's values."""
        assert self.info is not None
        if arrays:
            return _values(self.info, reply.forecast, reply.quantile_forecast)
        return _frame(self.info, reply.forecast, reply.quantile_forecast, self._last_index, self._offset)


class _ObserveMany:
    """What `observe_many` keeps between its (at most two) ObserveBatch calls, for both clients. A session
    whose last step's outcome is unknown has that step resent first, in a call of its own (as `observe`
    does); a resend refused for good stands as the answer to that session's new rows, which are not sent.
    Then every other session's new rows go in one call, each numbered by its session."""

    def __init__(self, target: str, steps: Sequence[tuple[_SessionState[Any], Any]], arrays: bool = False) -> None:
        self.target = target
        self.arrays = arrays  # each forecast as an array, not a frame
        seen: set[int] = set()
        for session, _ in steps:
            if id(session) in seen:
                raise ClientError(
                    f"session {session.id} appears twice in one observe_many; send its rows together "
                    "(one array of rows x features) or in the next call"
                )
            seen.add(id(session))
        self.steps = [(session, session._step(rows)[0]) for session, rows in steps]
        self.results: list[pd.DataFrame | ClientError | None] = [None] * len(steps)
        self._items: list[tuple[int, _SessionState[Any], int, np.ndarray]] = []
        self._final = False

    def messages(self, limit_mb: int | None = None) -> Iterator[pb.ObserveBatchRequest]:
        """The resends, then the new rows: each message to send, once the one before is `answered` (or has
        `failed`). With `limit_mb` (a stream's), a message over it fails by itself, unsent (sent, it would end
        the stream)."""
        for final in (False, True):
            request = self.request(final)
            if request is None:
                continue
            if limit_mb is not None and (size := request.ByteSize()) > limit_mb * 1024 * 1024:
                too_big = ClientError(
                    f"{self.target}: a StreamBatch message of {size} bytes is over max_message_mb ({limit_mb} "
                    "MiB): send fewer steps or rows per call",
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                self.failed(too_big)
                raise too_big
            self._final = final
            yield request

    def request(self, final: bool) -> pb.ObserveBatchRequest | None:
        """The resends (`final` False) or the new rows (True) as one message; None when there are none."""
        if final:
            self._items = [(k, s, s.next_sequence, x) for k, (s, x) in enumerate(self.steps) if self.results[k] is None]
        else:
            self._items = [(k, s, *s._pending) for k, (s, _) in enumerate(self.steps) if s._pending is not None]
        if not self._items:
            return None
        return pb.ObserveBatchRequest(steps=[s._request(seq, x) for _, s, seq, x in self._items])

    def failed(self, error: ClientError) -> None:
        """The call failed as a whole: each step's outcome is what the call's status says."""
        for _, s, seq, x in self._items:
            s._sent(seq, x, error, whole=True)

    def answered(self, reply: pb.ObserveBatchResponse) -> None:
        if len(reply.results) != len(self._items):
            raise ClientError(f"{self.target}: {len(reply.results)} results for {len(self._items)} steps")
        # every step numbered first (cheap), the frames after (most of the time): an interrupt while the frames
        # are built leaves no applied step unnumbered
        pairs = list(zip(self._items, reply.results, strict=True))
        numbered = 0
        try:
            for (k, s, seq, x), r in pairs:
                if r.WhichOneof("result") == "forecast":
                    s._sent(seq, x, None)
                else:
                    error = _step_error(self.target, s.id, seq, r.error)
                    s._sent(seq, x, error)
                    self.results[k] = error
                numbered += 1
        except BaseException:  # interrupted: the steps not numbered yet are resent (answered from the store)
            for (_, s, seq, x), _ in pairs[numbered:]:
                s._sent(seq, x, _interrupted(self.target))
            raise
        if self._final:
            for (k, s, _, _), r in pairs:
                if r.WhichOneof("result") == "forecast":
                    self.results[k] = s._answer(r, self.arrays)

    def out(self) -> list[pd.DataFrame | ClientError]:
        done = [r for r in self.results if r is not None]
        assert len(done) == len(self.results), "every step is answered once both calls are"
        return done

    def answered_message(self, reply: pb.ObserveBatchResponse) -> None:
        """A StreamBatch answer: a message refused as a whole fails its steps as a failed call would (and
        raises); otherwise `answered`."""
        if reply.HasField("error"):
            code = _CODES.get(reply.error.code, grpc.StatusCode.UNKNOWN)
            error = ClientError(f"{self.target}: StreamBatch message refused: {code.name}: {reply.error.message}", code)
            self.failed(error)
            raise error
        self.answered(reply)


class _Sessions:
    """Each session's steps on a batch stream go one at a time, in the order of the calls naming it: a call
    takes its place behind the last call naming each of its sessions when it is made (before any await), and
    goes once those calls are done (their sequence numbers and resends decide its own)."""

    def __init__(self) -> None:
        self.last: dict[int, asyncio.Future[None]] = {}  # id(session) -> the last call naming it

    async def hold(self, steps: Sequence[tuple[Any, Any]]) -> asyncio.Future[None]:
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before = {f for s, _ in steps if (f := self.last.get(id(s))) is not None and not f.done()}
        for s, _ in steps:
            self.last[id(s)] = mine
        try:
            if before:
                await asyncio.wait(before)
        except asyncio.CancelledError:  # gone before its turn: the calls behind it still wait for those before
            asyncio.gather(*before, return_exceptions=True).add_done_callback(lambda _: self.let_go(steps, mine))
            raise
        return mine

    def let_go(self, steps: Sequence[tuple[Any, Any]], mine: asyncio.Future[None]) -> None:
        for s, _ in steps:
            if self.last.get(id(s)) is mine:
                del self.last[id(s)]
        if not mine.done():
            mine.set_result(None)


_BACKGROUND: set[asyncio.Future[Any]] = set()  # tasks nobody awaits, kept alive until they end


def _background(work: Any) -> None:
    """Runs a coroutine to its end without a caller (its failure is logged by asyncio, not raised)."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _retrieved(answer: asyncio.Future[Any]) -> None:
    """Reads a future's exception, so that one whose caller has gone is not reported as never retrieved."""
    if not answer.cancelled():
        answer.exception()


def _own(client: Any, steps: Sequence[tuple[_SessionState[Any], Any]]) -> None:
    """Refuses a step of a session that another client opened."""
    for session, _ in steps:
        if session.client is not client:
            raise ClientError(f"session {session.id} belongs to another client")


def _closed(target: str) -> ClientError:
    return ClientError(f"{target}: this StreamBatch stream is closed", grpc.StatusCode.FAILED_PRECONDITION)


def _ended(target: str) -> ClientError:
    return ClientError(f"{target}: the StreamBatch stream ended before answering", grpc.StatusCode.UNAVAILABLE)


def _late_answer(target: str, timeout: float | None) -> ClientError:
    return ClientError(
        f"{target}: DEADLINE_EXCEEDED: no StreamBatch answer within {timeout} s (the stream was cancelled)",
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _interrupted(target: str) -> ClientError:
    """What a step whose caller gave up while it was on its way stands as: its outcome unknown (resent)."""
    return ClientError(f"{target}: interrupted while the step was on its way", grpc.StatusCode.CANCELLED)


def _unknown(error: ClientError) -> ClientError:
    """The failure of a stream, as the outcome of each message written on it and not answered: unknown
    (the server may have applied it), so its steps are resent, whatever status ended the stream."""
    return ClientError(str(error), grpc.StatusCode.UNAVAILABLE)


class Session(_SessionState[Client]):
    """`observe(rows)` numbers its steps itself; see the module's docstring for what a retry does."""

    def open(self) -> Session:
        """Opens the session unless it is open (one open at a time: two threads opening it open it once)."""
        with self._opening_lock:
            if not self.id:
                # a history is read in the columns of the version that opens: the newest info for it
                info = self.client.model_info(self.model, self.version, refresh=self.history is not None)
                request = self._open_request(info)
                try:
                    reply = self.client._call("OpenSession", request, self.proposed)
                except ClientError as e:
                    if e.code != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    # a retried open found the session its first attempt made, whose answer was lost: start anew
                    self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.proposed), self.proposed)
                    self.proposed = secrets.token_hex(16)
                    reply = self.client._call("OpenSession", request, self.proposed)
                if reply.version != info.version:  # another version became the default since info was cached
                    self.client.model_info(self.model, self.version, refresh=True)
                    self.info = self.client.model_info(self.model, reply.version)
                self._opened(reply)
        return self

    def observe(self, rows: Any) -> pd.DataFrame:
        """Applies new rows (a frame or an array [rows, features]) and returns the forecast after them."""
        self.open()
        x, _ = self._step(rows)
        if self._pending is not None:
            self._send(*self._pending)
        return self._answer(self._send(self.next_sequence, x))

    def _send(self, seq: int, x: np.ndarray) -> pb.ObserveResponse:
        try:
            reply = self.client._call("Observe", self._request(seq, x), self.id)
        except ClientError as e:
            self._sent(seq, x, e)
            raise
        except BaseException:  # the caller gave up (a cancel, a Ctrl-C): the step may have been applied
            self._sent(seq, x, _interrupted(self.client._conf.target))
            raise
        self._sent(seq, x, None)
        return reply

    def close(self) -> int:
        """Closes the session; the number of steps it applied (0 when it was never opened or is gone)."""
        if not self.id:
            return 0
        session_id, self.id = self.id, ""
        try:
            reply = self.client._call("CloseSession", pb.CloseSessionRequest(session_id=session_id), session_id)
            return int(reply.steps)
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:  # expired or lost in a restart: nothing left to close
                return 0
            raise

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Watchdog:
    """One thread for a blocking stream that runs an action (cancels the call) when an answer is late: armed
    before each wait and disarmed after, a lock and a notify each (a thread per message cost about 1 ms)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: float | None = None
        self._action: Any = None
        self._fired = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float, action: Any) -> None:
        with self._cond:
            self._due, self._action, self._fired = time.monotonic() + timeout, action, False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gatecast-stream-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> bool:
        """Whether the action ran since `arm`; once this returns it will not run."""
        with self._cond:  # the action runs under the lock: it has finished, or will not start
            self._due = self._action = None
            return self._fired

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._due is None:
                    self._cond.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                action, self._due, self._action, self._fired = self._action, None, None, True
                with contextlib.suppress(Exception):
                    action()


class BatchStream:
    """`Client.observe_many` over one StreamBatch call instead of one ObserveBatch call per round: the same
    answers, numbering and resends, one message per round on a stream that stays open. A message refused as
    a whole raises ClientError with its code and the stream stays open. If the stream fails (its status is
    raised as ClientError) or an answer takes longer than the client's `timeout` (DEADLINE_EXCEEDED, the
    stream is cancelled), the steps of the unanswered message are resent first on a new stream, opened by the
    next `observe_many`. One message at a time (a lock): `AsyncBatchStream` pipelines."""

    def __init__(self, client: Client, route: str = "") -> None:
        self.client = client
        self.route = route
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[pb.ObserveBatchRequest | None] | None = None
        self._answers: Any = None  # the call (its answers' iterator), while the stream is open
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._watchdog = _Watchdog()
        weakref.finalize(self, self._watchdog.stop)
        self._closed = False

    def observe_many(self, steps: Sequence[tuple[Session, Any]], *, arrays: bool = False) -> list[Any]:
        """As `Client.observe_many`, on this stream."""
        target = self.client._conf.target
        _own(self.client, steps)
        with self._lock:
            if self._closed:
                raise _closed(target)
            for session, _ in steps:
                session.open()
            many = _ObserveMany(target, steps, arrays)
            for request in many.messages(self.client._conf.max_message_mb):
                try:
                    reply = self._exchange(request)
                except ClientError as e:
                    many.failed(_unknown(e))
                    raise
                except BaseException:  # an interrupt while waiting: the message may have been applied
                    many.failed(_interrupted(target))
                    raise
                many.answered_message(reply)
            return many.out()

    def _open(self) -> None:
        requests: queue.SimpleQueue[pb.ObserveBatchRequest | None] = queue.SimpleQueue()
        self._requests = requests
        # a stream never closed still ends grpc's thread reading its requests once this object is gone
        self._finalizer = weakref.finalize(self, requests.put, None)
        metadata = self.client._conf.metadata(self.route)
        self._answers = self.client.stub.StreamBatch(iter(requests.get, None), metadata=metadata)

    def _end(self, cancel: bool) -> None:
        """Forgets the call (the next message opens another) and ends its request reader."""
        answers, requests = self._answers, self._requests
        self._answers = self._requests = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if requests is not None:
            requests.put(None)
        if cancel and answers is not None:
            answers.cancel()

    def _exchange(self, request: pb.ObserveBatchRequest) -> pb.ObserveBatchResponse:
        target, timeout = self.client._conf.target, self.client._conf.timeout
        try:
            if self._answers is not None and self._answers.done():  # ended while idle (a restart, a proxy)
                self._end(cancel=False)
            if self._answers is None:
                self._open()
            assert self._requests is not None
            if timeout is not None:
                self._watchdog.arm(timeout, self._answers.cancel)
            self._requests.put(request)
            return next(self._answers)  # type: ignore[no-any-return]
        except grpc.RpcError as e:
            self._end(cancel=False)
            if self._watchdog.disarm() and e.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                raise _late_answer(target, timeout) from None
            raise _error(target, e) from None
        except StopIteration:
            self._end(cancel=False)
            raise _ended(target) from None
        except BaseException:  # KeyboardInterrupt, a signal handler's exception: the stream is not usable
            self._end(cancel=True)
            raise
        finally:
            self._watchdog.disarm()  # a cancel that fired has been made before the next message looks

    def close(self) -> None:
        """Ends the stream (waiting for the server's end of it no longer than the client's timeout); later
        `observe_many` calls raise."""
        with self._lock:
            self._closed = True
            answers = self._answers
            self._end(cancel=False)
            try:
                if answers is not None:
                    if (timeout := self.client._conf.timeout) is not None:
                        self._watchdog.arm(timeout, answers.cancel)
                    with contextlib.suppress(grpc.RpcError):
                        for _ in answers:  # the server ends its side once it has read the end of ours
                            pass
            finally:
                self._watchdog.disarm()
                self._watchdog.stop()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the asyncio client ----------------------------------------------------------------------------------


class AsyncClient(_ClientBase):
    """`Client` for asyncio: the same arguments and methods, awaited."""

    _grpc = grpc.aio

    async def _call(self, method: str, request: Any, session: str = "") -> Any:
        try:
            metadata = self._conf.metadata(session)
            return await getattr(self.stub, method)(request, timeout=self._conf.timeout, metadata=metadata)
        except grpc.RpcError as e:
            raise _error(self._conf.target, e) from None

    async def model_info(self, model: str, version: int = 0, *, refresh: bool = False) -> pb.ModelInfo:
        _version(version)
        if refresh or (model, version) not in self._info:
            self._info[model, version] = await self._call("GetModel", pb.GetModelRequest(name=model, version=version))
        return self._info[model, version]

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._call("ListModels", pb.ListModelsRequest())).models)

    async def forecast(self, data: Any, model: str, version: int = 0, *, rows: int | None = None) -> pd.DataFrame:
        return (await self.forecast_many([data], model, version, rows=rows))[0]

    async def forecast_many(
        self, series: Sequence[Any], model: str, version: int = 0, *, rows: int | None = None
    ) -> list[pd.DataFrame]:
        info = await self.model_info(model, version)
        xs = _series(series, info, rows)
        reply = await self._call("Forecast", _forecast_request(model, version, [x for x, _ in xs]))
        if reply.version != info.version:
            info = await self.model_info(model, version, refresh=True)
        qs = list(reply.quantile_forecasts) or [None] * len(xs)
        return [_frame(info, f, q, index) for f, q, (_, index) in zip(reply.forecasts, qs, xs, strict=True)]

    def session(self, model: str, version: int = 0, *, history: Any = None) -> AsyncSession:
        return AsyncSession(self, model, version, history)

    async def observe_many(self, steps: Sequence[tuple[AsyncSession, Any]], *, arrays: bool = False) -> list[Any]:
        """`Client.observe_many`; sessions not yet open are opened concurrently."""
        _own(self, steps)
        await asyncio.gather(*(session.open() for session, _ in steps if not session.id))
        many = _ObserveMany(self._conf.target, steps, arrays)
        for request in many.messages():
            try:
                reply = await self._call("ObserveBatch", request)
            except ClientError as e:
                many.failed(e)
                raise
            except BaseException:  # the caller gave up: the steps may have been applied
                many.failed(_interrupted(self._conf.target))
                raise
            many.answered(reply)
        return many.out()

    def stream_batch(self, *, route: str = "") -> AsyncBatchStream:
        """`Client.stream_batch` for asyncio; concurrent `observe_many` calls on it pipeline their messages."""
        return AsyncBatchStream(self, route)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(_SessionState[AsyncClient]):
    async def open(self) -> AsyncSession:
        """Opens the session unless it is open; concurrent calls share one open (a caller cancelled while
        waiting leaves it to the others)."""
        if not self.id:
            if self._opening is None or self._opening.done():
                self._opening = asyncio.ensure_future(self._open())
            await asyncio.shield(self._opening)
        return self

    async def _open(self) -> None:
        if not self.id:
            # a history is read in the columns of the version that opens: the newest info for it
            info = await self.client.model_info(self.model, self.version, refresh=self.history is not None)
            request = self._open_request(info)
            try:
                reply = await self.client._call("OpenSession", request, self.proposed)
            except ClientError as e:
                if e.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                await self.client._call("CloseSession", pb.CloseSessionRequest(session_id=self.proposed), self.proposed)
                self.proposed = secrets.token_hex(16)
                reply = await self.client._call("OpenSession", request, self.proposed)
            if reply.version != info.version:  # another version became the default since info was cached
                await self.client.model_info(self.model, self.version, refresh=True)
                self.info = await self.client.model_info(self.model, reply.version)
            self._opened(reply)

    async def observe(self, rows: Any) -> pd.DataFrame:
        await self.open()
        x, _ = self._step(rows)
        if self._pending is not None:
            await self._send(*self._pending)
        return self._answer(await self._send(self.next_sequence, x))

    async def _send(self, seq: int, x: np.ndarray) -> pb.ObserveResponse:
        try:
            reply = await self.client._call("Observe", self._request(seq, x), self.id)
        except ClientError as e:
            self._sent(seq, x, e)
            raise
        except BaseException:  # the caller gave up (a cancel, a Ctrl-C): the step may have been applied
            self._sent(seq, x, _interrupted(self.client._conf.target))
            raise
        self._sent(seq, x, None)
        return reply

    async def close(self) -> int:
        """`Session.close`; an open still under way (its caller gone) is waited for, then closed."""
        if self._opening is not None and not self._opening.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._opening)
        if not self.id:
            return 0
        session_id, self.id = self.id, ""
        try:
            reply = await self.client._call("CloseSession", pb.CloseSessionRequest(session_id=session_id), session_id)
            return int(reply.steps)
        except ClientError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return 0
            raise

    async def __aenter__(self) -> AsyncSession:
        try:
            return await self.open()
        except asyncio.CancelledError:  # the open goes on (shared): what it opens is closed, as __aexit__ would
            _background(self.close())
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncBatchStream:
    """`BatchStream` for asyncio. Concurrent `observe_many` calls pipeline: each writes its message once the
    calls made before it that name any of its sessions are done (so each session's steps apply in call
    order), and the answers, which come in message order, go to the calls in the order their messages were
    written. A caller that is cancelled leaves its message to be written whole and its answer unread (its
    steps are resent first by the next call naming them); a stream that fails, or an answer later than the
    client's `timeout` (the stream is then cancelled), fails every call waiting on it."""

    def __init__(self, client: AsyncClient, route: str = "") -> None:
        self.client = client
        self.route = route
        self._call: Any = None  # the open StreamBatch call
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[pb.ObserveBatchResponse]] = deque()  # written, not answered
        self._write = asyncio.Lock()  # one write at a time, its answer's place queued with it
        self._sessions = _Sessions()
        self._closed = False
        self._sends: set[asyncio.Future[None]] = set()  # messages on their way to the stream

    async def observe_many(self, steps: Sequence[tuple[AsyncSession, Any]], *, arrays: bool = False) -> list[Any]:
        """As `AsyncClient.observe_many`, on this stream."""
        target = self.client._conf.target
        _own(self.client, steps)
        mine = await self._sessions.hold(steps)
        try:
            await asyncio.gather(*(session.open() for session, _ in steps if not session.id))
            many = _ObserveMany(target, steps, arrays)
            for request in many.messages(self.client._conf.max_message_mb):
                if self._closed:  # nothing of it sent: close() waits only for messages already on their way
                    raise _closed(target)
                try:
                    reply = await self._exchange(request)
                except ClientError as e:
                    many.failed(_unknown(e))
                    raise
                except BaseException:  # the caller gave up (cancelled): the message may have been applied
                    many.failed(_interrupted(target))
                    raise
                many.answered_message(reply)
            return many.out()
        finally:
            self._sessions.let_go(steps, mine)

    async def _exchange(self, request: pb.ObserveBatchRequest) -> pb.ObserveBatchResponse:
        """Sends a message and waits for its answer. The message and its answer belong to the stream, not to
        the caller: a caller that goes away leaves the message to be written whole (cut short, grpc would
        cancel the whole stream) and its answer to be read and dropped, and its deadline still holds."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[pb.ObserveBatchResponse] = loop.create_future()
        answer.add_done_callback(_retrieved)
        timeout = self.client._conf.timeout
        if timeout is not None:  # from now: a message that cannot even be written in time fails too
            timer = loop.call_later(timeout, self._late, answer)
            answer.add_done_callback(lambda _: timer.cancel())
        send = asyncio.ensure_future(self._send(request, answer))
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)
        await asyncio.wait({answer})  # a cancel of the caller ends this wait, never the answer or the send
        return answer.result()

    def _late(self, answer: asyncio.Future[pb.ObserveBatchResponse]) -> None:
        """No answer within the timeout: the stream it was written on (or is waiting to be written on) is
        cancelled, and every message waiting on it fails; a message not yet written is not sent."""
        if answer.done():
            return
        target, timeout = self.client._conf.target, self.client._conf.timeout
        error = _late_answer(target, timeout)
        call, self._call = self._call, None
        self._fail_waiting(error)
        if not answer.done():
            answer.set_exception(error)
        if call is not None:
            call.cancel()

    async def _send(self, request: pb.ObserveBatchRequest, answer: asyncio.Future[pb.ObserveBatchResponse]) -> None:
        """Writes the message and queues its answer's place; never leaves the answer unresolved."""
        try:
            async with self._write:
                if answer.done():  # timed out before its turn to be written: not sent
                    return
                if self._call is None:
                    self._call = self.client.stub.StreamBatch(metadata=self.client._conf.metadata(self.route))
                    self._reader = asyncio.create_task(self._read(self._call))
                call = self._call
                self._waiting.append(answer)
                try:
                    await call.write(request)
                except (grpc.RpcError, asyncio.InvalidStateError):
                    pass  # the stream has failed: the reader fails every waiting message with its status
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    # grpc cancelled the call under the write (a timeout): the waiting messages are failed
        except Exception as e:  # opening the stream failed: this message fails by itself
            if not answer.done():
                target = self.client._conf.target
                answer.set_exception(ClientError(f"{target}: StreamBatch: {e}", grpc.StatusCode.UNAVAILABLE))

    def _fail_waiting(self, error: ClientError) -> None:
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(error)

    async def _read(self, call: Any) -> None:
        """Hands each answer to the oldest message waiting; when the stream ends, fails those still waiting
        (a later message opens a new stream)."""
        target = self.client._conf.target
        error = _ended(target)
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                if self._call is not call:  # given up on (a late answer): what waits is on a newer stream
                    return
                if self._waiting:
                    answer = self._waiting.popleft()
                    if not answer.done():
                        answer.set_result(reply)
        except grpc.RpcError as e:
            error = _error(target, e)
        except asyncio.CancelledError:
            error = ClientError(f"{target}: the StreamBatch stream was cancelled", grpc.StatusCode.CANCELLED)
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task cancelled (the loop is ending): what waits
                if self._call is call:  # fails, and the cancel goes on
                    self._call = None
                    self._fail_waiting(error)
                raise
            # else grpc's read of a call cancelled here (a late answer, a cancelled close): the stream's end
        if self._call is call:
            self._call = None
            self._fail_waiting(error)

    async def close(self) -> None:
        """Ends the stream once the messages on their way have their answers (within the timeout each), and
        waits for the server's end of it no longer than the timeout; messages not yet on their way (later
        calls, and calls still waiting for their sessions' calls before them) raise. Cancelled, it cancels
        the stream."""
        self._closed = True
        try:
            if self._sends:
                await asyncio.wait(set(self._sends))  # never cancels them
            call, reader = self._call, self._reader
            if call is None or reader is None:
                return
            async with self._write:
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            timeout = self.client._conf.timeout
            try:  # the server ends its side once it has read the end of ours: a peer that never does is left
                await asyncio.wait_for(asyncio.shield(reader), timeout)
            except TimeoutError:
                call.cancel()
                await reader
        except asyncio.CancelledError:
            if self._call is not None:
                self._call.cancel()
            raise

    async def __aenter__(self) -> AsyncBatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
