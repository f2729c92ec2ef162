"""The Forecaster servicer: protobuf in, plain calls into the repository, batcher and sessions, protobuf
out. Errors are ours (service.errors) and become gRPC statuses in one place (`_call`).

Requests are decoded by tolerant deserializers (`add_to_server`): bytes that are not a valid message
become a `Malformed` value the handler answers with INVALID_ARGUMENT (on Stream: an error answer for
that message, and the stream goes on), instead of grpc's UNKNOWN and a logged traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import grpc
import numpy as np

from gatecast import SESSION_HEADER
from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

from .auth import caller_identity
from .batcher import Output
from .convert import (
    _SESSION_ID,
    Malformed,
    _varint,
    check_session_id,
    quote,
    to_array,
    to_matrix,
    to_quantile_matrix,
)
from .errors import InvalidArgument, MalformedRequest, NotFound, ServiceError
from .forecast_pool import ForecastPool
from .metrics import Metrics, observe_many
from .oneshot import forecast_head, forecast_inputs, forecast_response
from .repository import ModelVersion, Repository
from .sessions import SLOT_MASK, Session, SessionTable, rows_digest, rows_digests
from .sessions import Known as KnownId
from .settings import Settings
from .wire import BatchWire, Known, Uniform, answers, matrix_field, read_step

log = logging.getLogger(__name__)

MAX_MODEL_NAME = 64  # the manifest's limit: a longer name cannot be loaded
MAX_MESSAGE = 1024  # an error message is never longer than this


def _tolerant(decode: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as e:  # protobuf DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(type_name, str(e) or type(e).__name__)

    return deserialize


_WIRE_ANSWERS = {"ObserveBatch", "StreamBatch"}  # their handlers may answer with the message's wire form
_decode_forecast = _tolerant(pb.ForecastRequest.FromString, pb.ForecastRequest.DESCRIPTOR.full_name)
_decode_observe = _tolerant(pb.ObserveRequest.FromString, "gatecast.v1.ObserveRequest")  # a Stream message


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that sends bytes as they are: the batch RPCs write their answers directly."""

    def serializer(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serializer


class _Capture:
    """Stands in for a server to read the handlers the generated code would register."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.name, self.handlers = name, handlers


def add_to_server(servicer: ForecasterServicer, server: Any) -> None:
    """What `add_ForecasterServicer_to_server` does, with request deserializers that never raise."""
    capture = _Capture()
    pb_grpc.add_ForecasterServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    service = pb.DESCRIPTOR.services_by_name["Forecaster"]
    handlers = {}
    for method, handler in capture.handlers.items():
        input_type = service.methods_by_name[method].input_type.full_name
        decode = handler.request_deserializer
        assert decode is not None
        if method in ("Forecast", "Stream"):
            # bytes in: a Forecast as a forecast worker reads it, a Stream message as wire.read_step reads it
            # (each decoded by protobuf here otherwise); bytes or a message out
            handler = handler._replace(  # type: ignore[attr-defined]
                request_deserializer=None, response_serializer=_passing_bytes(handler.response_serializer)
            )
        elif method in _WIRE_ANSWERS:  # read by service.wire (decoded by protobuf only when not uniform)
            handler = handler._replace(  # type: ignore[attr-defined]
                request_deserializer=BatchWire, response_serializer=_passing_bytes(handler.response_serializer)
            )
        else:
            handler = handler._replace(request_deserializer=_tolerant(decode, input_type))  # type: ignore[attr-defined]
        handlers[method] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))


class TolerantDecoding(grpc.aio.ServerInterceptor):
    """Malformed requests to the services gatecast does not write itself (health, reflection) answer
    INVALID_ARGUMENT like its own, instead of UNKNOWN with a traceback in the log: their deserializers
    are made tolerant and a malformed request is refused before their code sees it."""

    _OWN = f"/{pb.DESCRIPTOR.services_by_name['Forecaster'].full_name}/"  # decoded by add_to_server already

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}  # method -> its tolerant handler, built once

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = str(details.method)
        if method.startswith(self._OWN):
            return await continuation(details)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrap(method, await continuation(details))
            if wrapped is not None:  # only methods that exist: a client naming new ones must not grow the cache
                self._wrapped[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(method: str, handler: Any) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        # "inference.GRPCInferenceService.ModelInfer request": the package says which .proto to check against
        tolerant = _tolerant(handler.request_deserializer, method.strip("/").replace("/", ".") + " request")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem().message)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await refuse(request, context)
                return await inner_uu(request, context)

            return handler._replace(request_deserializer=tolerant, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await refuse(request, context)
                async for answer in inner_us(request, context):
                    yield answer

            return handler._replace(request_deserializer=tolerant, unary_stream=unary_stream)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        await refuse(request, context)
                        yield request

                async for answer in inner_ss(checked(), context):
                    yield answer

            return handler._replace(request_deserializer=tolerant, stream_stream=stream_stream)
        return handler


def _release(session: Session, step: asyncio.Future[Output]) -> None:
    """A step's end: the turn passes on, and its error counts as read. A caller that left while waiting
    (asyncio.shield drops its callback) never reads it, and asyncio would log "Future exception was
    never retrieved" at ERROR for a client's ordinary timeout."""
    session.release()
    if not step.cancelled():
        step.exception()


def _give_up(waiting: dict[asyncio.Future[None], Session]) -> None:
    """A caller has gone: its tickets not yet granted leave their lines. A granted ticket's callback still
    starts (and later releases) its step."""
    for ticket, session in list(waiting.items()):
        if not ticket.done():
            session.drop(ticket)


_STRING_1 = b"\x0a"  # the tag of a length-delimited field 1 (StreamResponse.session_id, ObserveBatchResponse.results)


def _wire_matrices(tag: int, a: np.ndarray) -> list[bytes]:
    """Each a[k] ([rows, cols]) as a Matrix field's wire form (its tag, length and message)."""
    n, rows, cols = a.shape
    field = matrix_field(tag, rows, cols)
    raw, size = np.ascontiguousarray(a, "<f4").tobytes(), 4 * rows * cols
    return [field + raw[k : k + size] for k in range(0, n * size, size)]


_BYTE = [bytes((i,)) for i in range(128)]  # one-byte varints


def _uint(n: int) -> bytes:
    """A varint, without a loop for the one- and two-byte ones a batch answer is made of."""
    if n < 128:
        return _BYTE[n]
    return bytes((n & 0x7F | 0x80, n >> 7)) if n < 16384 else _varint(n)


def _result(part: bytes) -> bytes:
    """A StreamResponse's wire form as field 1 (`results`) of an ObserveBatchResponse."""
    return _STRING_1 + _uint(len(part)) + part


class _Answer:
    """One batch message's answer, filled in step by step or block by block in any order: each result in its
    wire form; `done` resolves to the ObserveBatchResponse's wire form (sent as it is, see `_passing_bytes`).
    A message answered by one block of all its steps is that block's bytes, not joined again."""

    __slots__ = ("blocks", "done", "left", "n", "outer", "parts", "rpc", "servicer")

    def __init__(self, servicer: ForecasterServicer, rpc: str, n: int, outer: _Call) -> None:
        self.servicer, self.rpc, self.outer = servicer, rpc, outer
        self.n = n
        self.parts: list[bytes] = [b""] * n
        self.blocks: list[tuple[np.ndarray, bytes, int]] = []  # (steps, their records, one record's length)
        self.left = n
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def put(self, i: int, part: bytes) -> None:
        self.parts[i] = _result(part)
        self.left -= 1
        self._check()

    def put_many(self, idx: list[int], parts: list[bytes]) -> None:
        for i, part in zip(idx, parts, strict=True):
            self.parts[i] = _result(part)
        self.left -= len(idx)
        self._check()

    def put_block(self, idx: np.ndarray, records: bytes, size: int) -> None:
        """The results of steps idx (ascending), as consecutive records of `size` bytes each."""
        self.blocks.append((idx, records, size))
        self.left -= len(idx)
        self._check()

    def _check(self) -> None:
        if self.left or self.done.done():
            return
        if len(self.blocks) == 1 and len(self.blocks[0][0]) == self.n:
            self.done.set_result(self.blocks[0][1])  # every step, in order
            return
        for idx, records, size in self.blocks:
            for j, i in enumerate(idx.tolist()):
                self.parts[i] = records[j * size : (j + 1) * size]
        self.done.set_result(b"".join(self.parts))

    def reply(
        self, i: int, session_id: str, seq: int, call: _Call
    ) -> Callable[[Output | None, BaseException | None], None]:
        def reply(result: Output | None, error: BaseException | None) -> None:
            r = pb.StreamResponse(session_id=session_id, sequence=seq)
            if error is None:
                assert result is not None
                _fill(r, result)
                self.outer.model = self.outer.model or call.model
            else:
                code, message = self.servicer._status(self.rpc, call, error)
                r.error.code, r.error.message = code.value[0], message
            self.put(i, r.SerializeToString())

        return reply


def _put_steps(answer: _Answer, idx: list[int], ids: list[str], seq_list: list[int], out: Output) -> None:
    """A block's answers for steps idx of a message decoded by protobuf, each in its wire form."""
    ys = _wire_matrices(0x1A, out.y)  # every result: session_id (1), sequence (2), forecast (3)
    if out.q is not None:  # and quantile_forecast (5)
        qs = _wire_matrices(0x2A, out.q.reshape(*out.q.shape[:2], -1))
        ys = [y + q for y, q in zip(ys, qs, strict=True)]
    heads = [b"\x0a\x20" + ids[i].encode() + b"\x10" for i in idx]
    answer.put_many(idx, [h + _uint(s) + y for h, s, y in zip(heads, seq_list, ys, strict=True)])


def _fill(response: Any, out: Output) -> None:
    """A step's answer into its message (ObserveResponse, StreamResponse, OpenSessionResponse): the forecast,
    and the quantile forecast when the model has one."""
    response.forecast.CopyFrom(to_matrix(out.y))
    if out.q is not None:
        response.quantile_forecast.CopyFrom(to_quantile_matrix(out.q))


class _Message:
    """A StreamBatch message in flight: its answer, the steps it counts toward max_stream_inflight, its call
    for the metrics (None once counted) and whether its steps have begun."""

    __slots__ = ("answer", "begun", "call", "steps")

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] | None = None
        self.steps = 1
        self.call: _Call | None = _Call()
        self.begun = False


# a claimed one-row Stream step: slot, sequence, the row's bytes, the answer's head, then where its answer goes
# (`put(place, answer)`) and when it was read
_Claimed = tuple[int, int, bytes, bytes, Callable[[list[Any], Any], None], list[Any], float]


class _Call:
    """Per-request bookkeeping: the model label for metrics is known only once the request is read."""

    __slots__ = ("model", "start")

    def __init__(self) -> None:
        self.model = ""
        self.start = time.monotonic()


def _proposed_id(context: grpc.aio.ServicerContext) -> str | None:
    """The session id a client proposed on OpenSession (metadata SESSION_HEADER), so that a proxy hashing
    that header routes the open and every later call of the session to the same replica."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_HEADER:
            if not isinstance(value, str) or not _SESSION_ID.match(value):
                raise InvalidArgument(
                    f"metadata {SESSION_HEADER} {quote(str(value))} on OpenSession is malformed; expected 32 "
                    "lowercase hex characters (128 random bits) to become the session's id, or no such metadata"
                )
            return value
    return None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _UniformBlock:
    """Claimed steps of a uniform batch message run as one batcher item (see `_Recorder`)."""

    __slots__ = ("answer", "members", "mv", "recorded", "seqs", "slots", "steps", "u", "x")

    def __init__(
        self,
        mv: ModelVersion,
        u: Uniform,
        members: np.ndarray | None,
        steps: np.ndarray,
        slots: np.ndarray,
        seqs: np.ndarray,
        x: np.ndarray,
        answer: _Answer,
    ) -> None:
        self.mv, self.u, self.members, self.steps = mv, u, members, steps
        self.slots, self.seqs, self.x, self.answer = slots, seqs, x, answer
        self.recorded = False  # its run succeeded and it is the recorder's to record and answer

    def session_id(self, i: int) -> str:
        return bytes(self.u.records[i, 4:36]).decode()


class _Recorder:
    """Records and answers uniform blocks whose model run has succeeded, all that one turn of the event loop
    delivers at once (a run holds a block of every stream whose message arrived meanwhile): per version, one
    write per column for all of them, then their turns let go in one write, then each message's answer.
    A block is handed over as the batcher's commit, so it is recorded even when its caller has gone, and
    before anything scheduled after it can take its sessions' turns."""

    def __init__(self, servicer: ForecasterServicer) -> None:
        self.servicer = servicer
        self.sessions = servicer.sessions
        self.pending: list[tuple[_UniformBlock, Output]] = []

    def add(self, block: _UniformBlock, out: Output) -> None:
        block.recorded = True
        self.pending.append((block, out))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        versions: dict[int, list[tuple[_UniformBlock, Output]]] = {}
        for item in pending:
            versions.setdefault(id(item[0].mv), []).append(item)
        for items in versions.values():
            mv = items[0][0].mv
            slots = items[0][0].slots if len(items) == 1 else np.concatenate([b.slots for b, _ in items])
            try:
                self._record(mv, slots, items)
            except Exception as e:  # nothing recorded and no turn let go: answer each step, let go of each turn
                log.exception("recording %d block(s) failed", len(items))
                self._fail(items, e)
                continue
            try:
                self.sessions.release_block(mv, slots)
            except Exception:  # the steps are recorded: answered all the same. A turn already handed on must
                # not be let go again (its new holder's step would run twice), so what is still held stays held
                log.exception("letting go of the turns of %d block(s) failed", len(items))
            for block, out in items:
                try:
                    block.answer.outer.model = block.answer.outer.model or mv.name
                    block.answer.put_block(block.steps, *answers(block.u, block.members, out.y, out.q))
                except Exception as e:
                    log.exception("answering a block failed")
                    if not block.answer.done.done():
                        block.answer.done.set_exception(e)

    def _record(self, mv: ModelVersion, slots: np.ndarray, items: list[tuple[_UniformBlock, Output]]) -> None:
        if len(items) == 1:
            block, out = items[0]
            seqs, x, merged = block.seqs, block.x, out
        else:
            seqs = np.concatenate([b.seqs for b, _ in items])
            x = np.concatenate([b.x for b, _ in items])
            qs = [o.q for _, o in items if o.q is not None]  # a version's blocks all have one, or none
            merged = Output(np.concatenate([o.y for _, o in items]), np.concatenate(qs) if qs else None)
        self.sessions.commit_block(mv, slots, seqs, 1, rows_digests(x), merged)

    def _fail(self, items: list[tuple[_UniformBlock, Output]], error: BaseException) -> None:
        """Each block's state put back (nothing was recorded, so nothing may stay applied), its steps answered
        with `error` and their turns let go (none was let go yet)."""
        for block, out in items:
            try:
                block.mv.batcher.restore(block.slots, out)
                self.sessions.release_block(block.mv, block.slots)
                self.servicer._fail_steps(block.mv, block.steps, block.session_id, block.seqs, block.answer, error)
            except Exception as e:
                log.exception("failing a block failed")
                if not block.answer.done.done():
                    block.answer.done.set_exception(e)


class Front:
    """What every gRPC front over the engine (gatecast's API, KServe v2) does around its handlers, in one
    place: count each call by rpc, model and status, time it, and turn our errors into their status."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}

    def _count(self, rpc: str, call: _Call, code: grpc.StatusCode) -> None:
        key = (rpc, call.model, code.name)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        lkey = (rpc, call.model)
        hist = self._latency.get(lkey)
        if hist is None:
            hist = self._latency[lkey] = self.metrics.latency.labels(*lkey)
        hist.observe(time.monotonic() - call.start)

    def _count_ok(self, rpc: str, model: str, starts: list[float]) -> None:
        """`_count` of OK for many calls of one model (each one's start) at once."""
        key = (rpc, model, "OK")
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(*key)
        counter.inc(len(starts))
        lkey = (rpc, model)
        hist = self._latency.get(lkey)
        if hist is None:
            hist = self._latency[lkey] = self.metrics.latency.labels(*lkey)
        now = time.monotonic()
        observe_many(hist, [now - start for start in starts])

    def _status(self, rpc: str, call: _Call, error: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status for an error, counted: ours carry their code; anything else is logged with a request
        id and answered INTERNAL without its text."""
        if isinstance(error, MalformedRequest):
            self.metrics.malformed.labels(rpc).inc()
            call.model = ""  # nothing it names is to be believed
        if isinstance(error, ServiceError):
            code, message = error.code, error.message
            if len(message) > MAX_MESSAGE:
                message = message[: MAX_MESSAGE - 20] + f"... ({len(message)} chars)"
        else:
            request_id = uuid.uuid4().hex[:12]
            log.error("%s failed (request id %s)", rpc, request_id, exc_info=error)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        self._count(rpc, call, code)
        return code, message

    async def _call(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[_Call], Awaitable[Any]],
        request: Any = None,
    ) -> Any:
        call = _Call()
        try:
            if isinstance(request, Malformed):
                raise request.problem()
            result = await handler(call)
        except asyncio.CancelledError:
            self._count(rpc, call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            code, message = self._status(rpc, call, e)
            try:
                await context.abort(code, message)
            except grpc.aio.AbortError:
                raise  # the status went out: this is how grpc ends the call
            except Exception as unsent:
                # the client went away (deadline, cancel) before the status could be sent: nothing to answer,
                # and not a server error for grpc to log
                raise asyncio.CancelledError from unsent
        self._count(rpc, call, grpc.StatusCode.OK)
        return result


class ForecasterServicer(Front, pb_grpc.ForecasterServicer):
    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        sessions: SessionTable,
        metrics: Metrics,
        forecasts: ForecastPool | None = None,
    ) -> None:
        super().__init__(metrics)
        self.settings = settings
        self.repo = repo
        self.sessions = sessions
        self._step_counters: dict[str, tuple[Any, Any]] = {}  # rpc -> batch_steps (block, single)
        self._recorder = _Recorder(self)
        self.forecasts = forecasts  # the forecast workers; None: every Forecast runs in this process
        self._in_process = metrics.forecast_path.labels("process")
        # claimed one-row Stream steps not yet started, by (version, deadline): started as one block at the
        # end of the turn they were claimed in, or once the run their version's batcher is busy with has been
        # delivered (`_flush_steps`, `_gathering`)
        self._pending: dict[tuple[ModelVersion, float | None], list[_Claimed]] = {}
        self._gathering: set[tuple[ModelVersion, float | None]] = set()  # groups waiting for their version's run

    # --- the work, transport-free but for the messages ----------------------------------------------

    def _resolve(self, name: str, version: int) -> ModelVersion:
        if len(name) > MAX_MODEL_NAME:
            raise NotFound(
                f"model {quote(name, MAX_MODEL_NAME)} not found: model names are at most {MAX_MODEL_NAME} characters"
            )
        return self.repo.resolve(name, version)

    def _start_step(
        self, session: Session, mv: ModelVersion, x: np.ndarray, deadline: float | None, seq: int | None
    ) -> asyncio.Future[Output] | Output:
        """For the holder of the session's turn: the stored forecast for a retry (with the same rows), else
        the future of the step. The turn passes on when the step has really finished (not when its caller
        stops waiting)."""
        try:
            if session.closed:
                raise NotFound(f"session {session.id!r} not found: it was closed")
            digest = rows_digest(x) if seq is not None else b""
            if seq is not None and session.check_sequence(seq, digest):
                assert session.forecast is not None
                session.release()
                return Output(session.forecast, session.quantile_forecast)  # a retry: not applied twice
            commit = session.committer(seq, x.shape[0], digest) if seq is not None else None
            fut = self.sessions.stored(mv.batcher.submit(x, session.slot, deadline, commit), [session.id])
        except BaseException:
            session.release()
            raise
        fut.add_done_callback(lambda f: _release(session, f))
        session.last_used = time.monotonic()
        return fut

    async def _step(
        self, session: Session, mv: ModelVersion, x: np.ndarray, deadline: float | None, seq: int | None
    ) -> Output:
        """Applies rows to a session's state in its turn, so two steps never overlap."""
        await session.take()
        started = self._start_step(session, mv, x, deadline, seq)
        if isinstance(started, Output):
            return started
        return await asyncio.shield(started)  # a cancelled caller does not cancel an applied step

    def _prepare_observe(
        self, req: pb.ObserveRequest, call: _Call, owner: str | None
    ) -> tuple[Session, ModelVersion, np.ndarray]:
        session = self.sessions.get(check_session_id(req.session_id), owner)
        call.model = session.model
        if req.sequence == 0:
            raise InvalidArgument("sequence must be set: 1 for the first observation, then counting up by one")
        mv = session.mv
        x = to_array(req.rows, mv.runtime.manifest.n_features, "rows", self.settings.max_rows)
        return session, mv, x

    async def _observe(
        self, req: pb.ObserveRequest, deadline: float | None, call: _Call, owner: str | None
    ) -> pb.ObserveResponse:
        try:
            session, mv, x = self._prepare_observe(req, call, owner)
        except NotFound:  # issue 12: maybe another replica's, in the session store
            if (load := self.sessions.recover(req.session_id, owner)) is None or not await load:
                raise
            session, mv, x = self._prepare_observe(req, call, owner)
        out = await self._step(session, mv, x, deadline, req.sequence)
        response = pb.ObserveResponse(session_id=session.id, sequence=req.sequence)
        _fill(response, out)
        return response

    def _begin(
        self,
        req: pb.ObserveRequest,
        call: _Call,
        owner: str | None,
        deadline: float | None,
        reply: Callable[[Output | None, BaseException | None], None],
        waiting: dict[asyncio.Future[None], Session],
        recovered: bool = False,
    ) -> None:
        """Takes the step's turn now (so that no later message overtakes it), starts the step when the turn
        comes and calls `reply(result, error)` exactly once, all from callbacks: no task per step. A ticket
        not yet granted waits in `waiting`, for a caller that goes away to give up (`_give_up`). A session
        not here may be taken over from the session store first (`recovered`: that has been tried)."""
        try:
            session, mv, x = self._prepare_observe(req, call, owner)
        except NotFound as e:
            load = None if recovered else self.sessions.recover(req.session_id, owner)
            if load is None:
                reply(None, e)
                return

            missing = e

            def loaded(f: asyncio.Future[bool]) -> None:
                error = missing if f.cancelled() else f.exception()
                if error is None and f.result():
                    self._begin(req, call, owner, deadline, reply, waiting, recovered=True)
                else:
                    reply(None, error or missing)

            load.add_done_callback(loaded)
            return
        except Exception as e:
            reply(None, e)
            return

        def done(fut: asyncio.Future[Output]) -> None:
            if fut.cancelled():
                reply(None, ServiceError("the step was cancelled"))
            elif (e := fut.exception()) is not None:
                reply(None, e)
            else:
                reply(fut.result(), None)

        def start() -> None:
            try:
                started = self._start_step(session, mv, x, deadline, req.sequence)
            except Exception as e:
                reply(None, e)
                return
            if isinstance(started, Output):
                reply(started, None)
            else:
                started.add_done_callback(done)

        def granted(ticket: asyncio.Future[None]) -> None:
            waiting.pop(ticket, None)
            if not ticket.cancelled():  # cancelled only when the caller has gone: nobody to answer
                start()

        ticket = session.queue_turn()
        if ticket.done():
            start()
        else:
            waiting[ticket] = session
            ticket.add_done_callback(granted)

    def _open_group(self, mv: ModelVersion, deadline: float | None) -> list[_Claimed]:
        """The list this turn's claimed one-row Stream steps of `mv` (with this deadline) join; a new one is
        started at the end of the turn (`_flush_steps`)."""
        if len(self._pending) == len(self._gathering):  # the first group of this turn not gathering already
            asyncio.get_running_loop().call_soon(self._flush_steps)
        steps: list[_Claimed] = []
        self._pending[(mv, deadline)] = steps
        return steps

    def _flush_steps(self) -> None:
        """At the end of the turn the steps were claimed in: a version whose batcher is idle starts them now;
        one that is running a batch gathers them (and what later turns claim) until that run has been
        delivered, then starts them all, so that they ride in its next run as one block instead of one block
        per turn (`Batcher.after_run`)."""
        for group in list(self._pending):
            if group in self._gathering:
                continue  # started when its version's run has been delivered
            try:
                waits = group[0].batcher.after_run(partial(self._start_group, group))
            except Exception:  # never leave claimed steps behind: start them now
                log.exception("Stream: deferring steps failed")
                waits = False
            if waits:
                self._gathering.add(group)
            else:
                self._start_group(group)

    def _start_group(self, group: tuple[ModelVersion, float | None]) -> None:
        """Starts a group's claimed steps: a block per max_batch_size steps."""
        self._gathering.discard(group)
        steps = self._pending.pop(group, None)
        if not steps:
            return
        mv, deadline = group
        size = mv.batcher.max_batch_size
        for s in range(0, len(steps), size):
            self._start_steps(mv, deadline, steps[s : s + size] if len(steps) > size else steps)

    def _start_steps(self, mv: ModelVersion, deadline: float | None, steps: list[_Claimed]) -> None:
        """Claimed one-row Stream steps of one version as one batcher block (one model run, each session's
        step recorded in one write per column); each answer is its request's head (session_id and sequence,
        protobuf's bytes) and the forecast's wire form, or its own error."""
        slots = np.array([s[0] for s in steps], np.int64)
        seqs = [s[1] for s in steps]
        self._count_steps("Stream", len(steps), 0)

        def fail(error: BaseException) -> None:
            for _, seq, _, head, put, place, start in steps:
                call = _Call()
                call.model, call.start = mv.name, start
                code, message = self._status("Stream", call, error)
                response = pb.StreamResponse(session_id=head[2:34].decode(), sequence=seq)
                response.error.code, response.error.message = code.value[0], message
                put(place, response)

        def finish(fut: asyncio.Future[Output]) -> None:
            self.sessions.release_block(mv, slots)
            error = ServiceError("the step was cancelled") if fut.cancelled() else fut.exception()
            if error is not None:
                fail(error)
                return
            out = fut.result()
            ys = _wire_matrices(0x1A, out.y)  # forecast (3), then quantile_forecast (5)
            if out.q is not None:
                qs = _wire_matrices(0x2A, out.q.reshape(*out.q.shape[:2], -1))
                ys = [y + q for y, q in zip(ys, qs, strict=True)]
            self._count_ok("Stream", mv.name, [s[6] for s in steps])
            for (_, _, _, head, put, place, _), y in zip(steps, ys, strict=True):
                put(place, head + y)

        try:
            x = np.frombuffer(b"".join([s[2] for s in steps]), "<f4").reshape(len(steps), 1, -1)
            digests = rows_digests(x)

            def commit(out: Output) -> None:
                self.sessions.commit_block(mv, slots, seqs, 1, digests, out)

            fut = mv.batcher.submit_block(x, slots, deadline, commit)
            if self.sessions.store is not None:
                fut = self.sessions.stored(fut, [s[3][2:34].decode() for s in steps])
        except Exception as e:
            self.sessions.release_block(mv, slots)
            fail(e)
            return
        fut.add_done_callback(finish)

    def _count_steps(self, rpc: str, block: int, single: int) -> None:
        counters = self._step_counters.get(rpc)
        if counters is None:
            m = self.metrics.batch_steps
            counters = self._step_counters[rpc] = (m.labels(rpc, "block"), m.labels(rpc, "single"))
        if block:
            counters[0].inc(block)
        if single:
            counters[1].inc(single)

    def _check_steps(self, n: int) -> None:
        if n == 0:
            raise InvalidArgument("no steps given; expected one or more ObserveRequest in `steps`")
        if n > (limit := self.settings.max_batch_steps):
            raise InvalidArgument(
                f"{n} steps in one message; at most {limit} are accepted (GATECAST_MAX_BATCH_STEPS): split it"
            )

    def _begin_batch(
        self,
        rpc: str,
        wire: BatchWire,
        owner: str | None,
        deadline: float | None,
        waiting: dict[asyncio.Future[None], Session],
        outer: _Call,
        known: Known | None = None,
    ) -> tuple[asyncio.Future[bytes], int]:
        """Begins every step of a batch, in request order (steps of one session apply in that order); the
        future resolves to the answer (its wire form) once each step has its result; with it, the number of
        steps. Raises for a batch refused whole.

        The common step (one row, the next sequence of a free session) is claimed with its version's other
        such steps in one vectorised pass and runs as one batcher block; every other step (a retry, an
        error, a busy session, a session's later steps in the message) goes the way of a single Observe,
        after the claims, in request order. Metrics count each message once (OK) and each step's error.
        A uniform message (service.wire) is read and answered as arrays; any other is decoded by protobuf."""
        u = wire.uniform(known)
        if u is not None:
            return self._begin_uniform(rpc, u, wire, owner, deadline, waiting, outer, known)
        try:
            req = wire.message()
        except Exception as e:  # protobuf DecodeError, invalid UTF-8 in a string field, ...
            raise Malformed("gatecast.v1.ObserveBatchRequest", str(e) or type(e).__name__).problem() from None
        n = len(req.steps)
        self._check_steps(n)
        answer = _Answer(self, rpc, n, outer)
        table = self.sessions
        steps = list(req.steps)  # indexing a repeated field makes a new wrapper each time
        ids = [step.session_id for step in steps]
        seq_of = [step.sequence for step in steps]
        rows = [step.rows for step in steps]
        codes = table.locate_many(ids)
        fast: dict[int, list[int]] = {}  # version number -> steps that may run in a block
        slow: list[int] = []
        seen: set[int] = set()
        for i, code in enumerate(codes):
            if code < 0 or code in seen or seq_of[i] == 0 or rows[i].rows != 1:
                slow.append(i)
            else:
                fast.setdefault(code >> 32, []).append(i)
            seen.add(code)
        for number, idx in fast.items():
            mv = table.version(number)
            n_f = mv.runtime.manifest.n_features
            shaped = [i for i in idx if rows[i].cols == n_f and len(rows[i].values) == n_f]
            if not shaped:  # each refused the way a single Observe refuses it, below
                slow += idx
                continue
            x = np.array([v for i in shaped for v in rows[i].values], np.float32).reshape(len(shaped), 1, n_f)
            finite = np.isfinite(x).reshape(len(shaped), n_f).all(axis=1)
            slots = np.array([codes[i] & SLOT_MASK for i in shaped], np.int64)
            seqs = np.array([seq_of[i] for i in shaped], np.uint64)
            claimed = np.zeros(len(shaped), np.bool_)
            claimed[finite] = table.claim(mv, slots[finite], seqs[finite], owner)
            members = np.flatnonzero(claimed)
            running = {shaped[j] for j in members.tolist()}
            slow += [i for i in idx if i not in running]
            size = mv.batcher.max_batch_size
            for s in range(0, len(members), size):
                k = members[s : s + size]
                block = [shaped[j] for j in k.tolist()]
                seq_list = seqs[k].tolist()
                deliver = partial(_put_steps, answer, block, ids, seq_list)
                self._start_block(mv, block, ids.__getitem__, x[k], slots[k], seq_list, answer, deadline, deliver)
        self._count_steps(rpc, n - len(slow), len(slow))
        for i in sorted(slow):
            call = _Call()
            self._begin(steps[i], call, owner, deadline, answer.reply(i, ids[i], seq_of[i], call), waiting)
        return answer.done, n

    def _begin_uniform(
        self,
        rpc: str,
        u: Uniform,
        wire: BatchWire,
        owner: str | None,
        deadline: float | None,
        waiting: dict[asyncio.Future[None], Session],
        outer: _Call,
        known: Known | None = None,
    ) -> tuple[asyncio.Future[bytes], int]:
        """`_begin_batch` for a uniform message: sessions found, checked and claimed as arrays. With `known`
        (a stream's), sessions named by the previous message too are not looked up again (`_known_codes`);
        when they are distinct live sessions of one version, a message whose every step is well formed is
        claimed and run whole, with no array indexed by step."""
        n = len(u.seqs)
        self._check_steps(n)
        answer = _Answer(self, rpc, n, outer)
        table = self.sessions
        codes, plan = self._known_codes(u, known)
        # (version, its feature count, the steps or None for all of them, their slots) per version
        groups: list[tuple[ModelVersion, int, np.ndarray | None, np.ndarray]]
        slow: list[int] = []
        # count_nonzero: a third of the time of .all() on arrays this small
        if plan is not None and np.count_nonzero(u.seqs) == n and np.count_nonzero(np.isfinite(u.x)) == u.x.size:
            groups = [plan]
        else:
            ok = (codes >= 0) & (u.seqs != 0) & np.isfinite(u.x).all(axis=(1, 2))
            ordered = np.sort(codes)
            if n > 1 and (ordered[1:] == ordered[:-1]).any():
                # a session's later steps in the message go the single way, after its first is claimed
                first = np.zeros(n, np.bool_)
                first[np.unique(codes, return_index=True)[1]] = True
                ok &= first
            fast = np.flatnonzero(ok)
            slow = np.flatnonzero(~ok).tolist() if len(fast) < n else []
            numbers = codes[fast] >> 32
            groups = []
            for number in np.unique(numbers).tolist():
                idx = fast[numbers == number]
                mv = table.version(number)
                groups.append((mv, mv.runtime.manifest.n_features, idx, codes[idx] & SLOT_MASK))
        for mv, n_features, idx, slots in groups:
            if n_features != u.layout.cols:
                slow += (np.arange(n) if idx is None else idx).tolist()  # the single way says what is wrong
                continue
            claimed = table.claim(mv, slots, u.seqs if idx is None else u.seqs[idx], owner)
            if np.count_nonzero(claimed) < len(claimed):
                idx = np.arange(n) if idx is None else idx
                slow += idx[~claimed].tolist()
                idx, slots = idx[claimed], slots[claimed]
            size = mv.batcher.max_batch_size
            if idx is None and n <= size:
                self._start_uniform_block(mv, u, None, slots, answer, deadline)  # the whole message
                continue
            members = np.arange(n) if idx is None else idx
            for s in range(0, len(members), size):
                self._start_uniform_block(mv, u, members[s : s + size], slots[s : s + size], answer, deadline)
        self._count_steps(rpc, n - len(slow), len(slow))
        if slow:
            steps = wire.message().steps  # bytes a uniform read accepted always decode
            for i in sorted(slow):
                step, call = steps[i], _Call()
                self._begin(step, call, owner, deadline, answer.reply(i, step.session_id, step.sequence, call), waiting)
        return answer.done, n

    def _known_codes(self, u: Uniform, known: Known | None) -> tuple[np.ndarray, Any]:
        """The codes of the message's sessions (-1: not a live session), and its plan: (version, its feature
        count, None, slots) when they are distinct live sessions of one version, else None. A stream's
        sessions named by the previous message too are reused while the table has removed no session
        since, else checked where they were (`still_live`); only otherwise looked up."""
        table = self.sessions
        same = known is not None and known.words is u.words
        if same and known is not None and known.codes is not None:
            if known.removed == table.removed:
                return known.codes, known.plan
            if table.still_live(known.codes, u.words):
                known.removed, known.plan = table.removed, self._plan(known.codes)  # versions may be renumbered
                return known.codes, known.plan
        codes = table.locate_words(u.words)
        plan = self._plan(codes)
        if same and known is not None:
            known.codes, known.plan = codes, plan
            known.removed = table.removed if codes.min() >= 0 else -1  # an id not found may be opened later
        return codes, plan

    def _plan(self, codes: np.ndarray) -> Any:
        numbers = codes >> 32
        if codes.min() < 0 or numbers.min() != numbers.max() or len(np.unique(codes)) != len(codes):
            return None
        mv = self.sessions.version(int(numbers[0]))
        return mv, mv.runtime.manifest.n_features, None, codes & SLOT_MASK

    def _start_uniform_block(
        self,
        mv: ModelVersion,
        u: Uniform,
        members: np.ndarray | None,
        slots: np.ndarray,
        answer: _Answer,
        deadline: float | None,
    ) -> None:
        """Claimed steps `members` of `u` (None: all of them, in order) as one block. Without a session
        store its run is recorded and answered by `_Recorder`, with the other blocks its turn of the loop
        delivers."""
        steps = np.arange(len(u.seqs)) if members is None else members
        x, seqs = (u.x, u.seqs) if members is None else (u.x[members], u.seqs[members])
        block = _UniformBlock(mv, u, members, steps, slots, seqs, x, answer)
        session_id = block.session_id
        if self.sessions.store is not None:

            def deliver(out: Output) -> None:
                answer.put_block(steps, *answers(u, members, out.y, out.q))

            self._start_block(mv, steps, session_id, x, slots, seqs, answer, deadline, deliver)
            return

        def failed(fut: asyncio.Future[Output]) -> None:
            if block.recorded:  # the run succeeded: the recorder records and answers it
                return
            self.sessions.release_block(mv, slots)
            error = ServiceError("the step was cancelled") if fut.cancelled() else fut.exception()
            self._fail_steps(mv, steps, session_id, seqs, answer, error or ServiceError("the step was not run"))

        try:
            fut = mv.batcher.submit_block(x, slots, deadline, partial(self._recorder.add, block))
        except Exception as e:
            self.sessions.release_block(mv, slots)
            self._fail_steps(mv, steps, session_id, seqs, answer, e)
            return
        fut.add_done_callback(failed)

    def _fail_steps(
        self,
        mv: ModelVersion,
        idx: list[int] | np.ndarray,
        session_id: Callable[[int], str],
        seqs: list[int] | np.ndarray,
        answer: _Answer,
        error: BaseException,
    ) -> None:
        """Answers each of the steps idx of a message (sequences `seqs`) with `error`."""
        for k, i in enumerate(idx):
            call = _Call()
            call.model = mv.name
            answer.reply(int(i), session_id(int(i)), int(seqs[k]), call)(None, error)

    def _start_block(
        self,
        mv: ModelVersion,
        idx: list[int] | np.ndarray,
        session_id: Callable[[int], str],
        x: np.ndarray,
        slots: np.ndarray,
        seq_list: list[int] | np.ndarray,
        answer: _Answer,
        deadline: float | None,
        deliver: Callable[[Output], None],
    ) -> None:
        """Claimed steps idx of a message (turns held) as one batcher item: one model run, each session's
        step recorded in one write per column; `deliver` puts the block's answers into `answer`."""
        digests = rows_digests(x)

        def commit(out: Output) -> None:
            self.sessions.commit_block(mv, slots, seq_list, 1, digests, out)

        def finish(fut: asyncio.Future[Output]) -> None:
            self.sessions.release_block(mv, slots)
            error = ServiceError("the step was cancelled") if fut.cancelled() else fut.exception()
            if error is not None:
                self._fail_steps(mv, idx, session_id, seq_list, answer, error)
                return
            answer.outer.model = answer.outer.model or mv.name
            deliver(fut.result())

        try:
            fut = mv.batcher.submit_block(x, slots, deadline, commit)
            if self.sessions.store is not None:
                fut = self.sessions.stored(fut, [session_id(int(i)) for i in idx])
        except Exception as e:
            self.sessions.release_block(mv, slots)
            self._fail_steps(mv, idx, session_id, seq_list, answer, e)
            return
        fut.add_done_callback(finish)

    # --- RPCs -----------------------------------------------------------------------------------------

    async def Forecast(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes | pb.ForecastResponse:
        """Read as bytes (see `add_to_server`): a request for a model a forecast worker holds goes to it as it
        is (service.forecast_pool), anything else is decoded and answered here."""
        return await self._call("Forecast", context, partial(self._forecast, request, context))  # type: ignore[no-any-return]

    async def _forecast(
        self, data: bytes, context: grpc.aio.ServicerContext, call: _Call
    ) -> bytes | pb.ForecastResponse:
        pool = self.forecasts
        if pool is not None and (head := forecast_head(data)) is not None:
            try:
                mv = self._resolve(*head)
            except NotFound:  # answered below, after the bytes are known to decode (a malformed request says so)
                mv = None
            if mv is not None:
                call.model = mv.name  # only loaded models become label values: clients cannot grow the metrics
                answer = await pool.forecast(mv, data, _deadline(context))  # Undecodable: counted as malformed
                if answer is not None:
                    return answer
        self._in_process.inc()
        request = _decode_forecast(data)
        if isinstance(request, Malformed):
            raise request.problem()
        mv = self._resolve(request.model, request.version)
        call.model = mv.name
        xs = forecast_inputs(request, mv.runtime.manifest, mv.batcher, self.settings)
        outs = await mv.batcher.forecast(xs, _deadline(context))
        return forecast_response(mv.runtime.manifest, outs)

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        async def handle(call: _Call) -> pb.OpenSessionResponse:
            mv = self._resolve(request.model, request.version)
            call.model = mv.name
            m = mv.runtime.manifest
            history = None
            # an empty matrix (no rows, no values, no columns or the model's) is no history; rows 0 beside
            # values, or beside another column count, is a matrix that lies about itself
            h = request.history
            if request.HasField("history") and (h.rows > 0 or h.values or h.cols not in (0, m.n_features)):
                mv.batcher.check_request_rows(request.history.rows)
                history = to_array(request.history, m.n_features, "history", self.settings.max_rows)
            rows = 0 if history is None else int(history.shape[0])
            owner = caller_identity(context, self.settings)  # see service.auth
            session = self.sessions.open(mv, owner, _proposed_id(context))
            response = pb.OpenSessionResponse(
                session_id=session.id,
                model=mv.name,
                version=mv.version,
                next_sequence=1,
                history_rows=rows,
                context_length=m.context_length,
                short_history=rows < m.context_length,
            )
            if history is not None:
                try:
                    out = await self._step(session, mv, history, _deadline(context), None)
                except BaseException:
                    # a step still queued or running keeps the slot until it has finished (see sessions)
                    self.sessions.discard(session)
                    raise
                if session.closed:  # by a client that knew the id it proposed: the slot may be another's now
                    raise NotFound(f"session {session.id!r} was closed while its history was being applied")
                session.steps += rows
                _fill(response, out)
            await self.sessions.opened(session)  # issue 12: in the session store before the client has its id
            if response.short_history:
                self.metrics.sessions_short_history.labels(mv.name, str(mv.version)).inc()
            return response

        return await self._call("OpenSession", context, handle, request)  # type: ignore[no-any-return]

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext) -> pb.ObserveResponse:
        async def handle(call: _Call) -> pb.ObserveResponse:
            return await self._observe(request, _deadline(context), call, caller_identity(context, self.settings))

        return await self._call("Observe", context, handle, request)  # type: ignore[no-any-return]

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        async def handle(call: _Call) -> pb.CloseSessionResponse:
            owner = caller_identity(context, self.settings)
            session = await self.sessions.close(check_session_id(request.session_id), owner)
            call.model = session.model
            return pb.CloseSessionResponse(session_id=session.id, steps=session.steps)

        return await self._call("CloseSession", context, handle, request)  # type: ignore[no-any-return]

    async def Stream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes | pb.StreamResponse]:
        """No task per message: each message takes its session's turn when it is read, its step starts from
        a callback, and it is answered from the step's done callback.

        The common message (one row, the next sequence of a free session: `wire.read_step`,
        `SessionTable.claim_step`) is read from its bytes and its turn claimed at once; the steps claimed by
        every stream while their version's batcher is busy start together, as one batcher block, when its
        run has been delivered (at the end of the turn when it is idle: `_flush_steps`), and are answered
        with their wire form. Any other message is decoded by protobuf and takes a ticket for its session's
        turn (`_begin`): a retry, an error, a session with a step in flight.

        Messages are read with `context.read()` as bytes (the request iterator is not used): one async
        generator less per message.

        Each message gets a place in its session's line (keyed by the session id it names) when it is read;
        an answer, forecast or error, leaves only when every earlier message of that session has been
        answered, so one session's answers come in its message order. At most `max_stream_inflight`
        messages are read and not yet sent: beyond that the stream stops reading, and a client that never
        reads its answers is held back by flow control instead of growing the server's buffers."""
        ready: deque[bytes | pb.StreamResponse | None] = deque()  # answers to send, None: the end
        wake: asyncio.Future[None] | None = None  # the sender waits on it while `ready` is empty
        lines: dict[bytes, deque[list[Any]]] = {}  # per session id, in message order: [answer or None, id]
        known: dict[bytes, KnownId] = {}  # where the ids this stream named were found (claim_step)
        waiting: dict[asyncio.Future[None], Session] = {}  # tickets of this stream not yet granted
        limit = self.settings.max_stream_inflight
        pending = 0  # read, not yet queued for sending
        unsent = 0  # read, not yet sent
        room = asyncio.Event()  # set when the reader, held back, may go on
        held = False  # the reader waits for room
        reading = True
        deadline = _deadline(context)
        owner = caller_identity(context, self.settings)  # one identity for the whole stream
        loop = asyncio.get_running_loop()
        claim = self.sessions.claim_step
        groups = self._pending
        now = time.monotonic

        def put(place: list[Any], item: bytes | pb.StreamResponse) -> None:
            """A message's answer: sent once every earlier message of its session has its own."""
            nonlocal pending
            place[0] = item
            key = place[1]
            line = lines[key]
            while line and line[0][0] is not None:
                ready.append(line.popleft()[0])
                pending -= 1
            if not line:
                del lines[key]
            if not reading and pending == 0:
                ready.append(None)
            if wake is not None and not wake.done():
                wake.set_result(None)

        def answer(
            place: list[Any], req: pb.ObserveRequest, call: _Call, result: Output | None, error: BaseException | None
        ) -> None:
            response = pb.StreamResponse(session_id=req.session_id, sequence=req.sequence)
            if error is None:
                assert result is not None
                _fill(response, result)
                self._count("Stream", call, grpc.StatusCode.OK)
            else:
                code, message = self._status("Stream", call, error)
                response.error.code = code.value[0]
                response.error.message = message
            put(place, response)

        def handle(data: bytes) -> None:
            nonlocal pending
            pending += 1
            step = read_step(data)
            if step is not None:
                key = data[2:34]
                place: list[Any] = [None, key]
                line = lines.get(key)
                if line is None:
                    lines[key] = deque((place,))
                else:
                    line.append(place)
                seq, cols, head = step
                claimed = claim(key, seq, cols, owner, known)
                if claimed is not None:
                    mv = claimed[0]
                    steps = groups.get((mv, deadline))
                    if steps is None:
                        steps = self._open_group(mv, deadline)
                    steps.append((claimed[1], seq, data[len(data) - 4 * cols :], data[:head], put, place, now()))
                    return
                req: pb.ObserveRequest | Malformed = _decode_observe(data)  # an id of other bytes may not be UTF-8
            else:
                req = _decode_observe(data)
                key = b"" if isinstance(req, Malformed) else req.session_id.encode()
                place = [None, key]
                lines.setdefault(key, deque()).append(place)
            self._count_steps("Stream", 0, 1)
            call = _Call()
            if isinstance(req, Malformed):
                answer(place, pb.ObserveRequest(), call, None, req.problem())
                return
            step_req = req
            self._begin(step_req, call, owner, deadline, lambda r, e: answer(place, step_req, call, r, e), waiting)

        async def read() -> None:
            nonlocal reading, unsent, held
            try:
                read_one = context.read
                while (data := await read_one()) is not grpc.aio.EOF:
                    unsent += 1
                    handle(data)  # type: ignore[arg-type]
                    while unsent >= limit:  # backpressure: wait until the client has taken answers
                        room.clear()
                        held = True
                        await room.wait()
            except Exception as e:  # the transport failed under us: say so, then end
                log.warning("Stream: reading requests failed: %s", e)
            finally:
                reading = False
                if pending == 0:
                    ready.append(None)
                    if wake is not None and not wake.done():
                        wake.set_result(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                if not ready:
                    wake = loop.create_future()
                    await wake
                    continue
                item = ready.popleft()
                if item is None:
                    break
                yield item
                unsent -= 1
                if held and unsent < limit:
                    held = False
                    room.set()
        finally:
            reader.cancel()
            _give_up(waiting)  # the stream is gone: give up its places in line

    async def ObserveBatch(self, request: BatchWire, context: grpc.aio.ServicerContext) -> bytes:
        async def handle(call: _Call) -> bytes:
            waiting: dict[asyncio.Future[None], Session] = {}
            owner = caller_identity(context, self.settings)
            done, _ = self._begin_batch("ObserveBatch", request, owner, _deadline(context), waiting, call)
            try:
                return await done  # started steps apply even if the caller goes: they answer nobody
            except asyncio.CancelledError:
                _give_up(waiting)
                raise

        return await self._call("ObserveBatch", context, handle, request)  # type: ignore[no-any-return]  # wire form

    async def StreamBatch(
        self, request_iterator: AsyncIterator[BatchWire], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """ObserveBatch on a stream, one answer per message in message order. A message's steps take their
        sessions' turns when it is read, so steps apply in arrival order across messages too. The stream
        reads on while fewer than `max_stream_inflight` steps are unanswered
        (a message refused whole as it is read counts one; any other, its steps).

        A gateway pipelines: it sends the next message for the same sessions before the answer to the
        previous one. Such a uniform message begins when the previous message's steps have finished (its
        turns are let go), as one block again, instead of every step waiting for its session's turn on its
        own. Any message read while an earlier one still waits to begin waits behind it too, so no message
        overtakes one read before it; a message that names other sessions than the one before begins at once."""
        lineup: deque[_Message] = deque()  # read (begun, or waiting to begin), not yet answered, in order
        ended = False  # the reader has stopped
        wake: asyncio.Future[None] | None = None  # what the writer waits on: the first message's answer
        waiting: dict[asyncio.Future[None], Session] = {}  # tickets of this stream not yet granted
        limit = self.settings.max_stream_inflight
        unsent = 0  # steps read, not yet answered
        room = asyncio.Event()
        deadline = _deadline(context)
        owner = caller_identity(context, self.settings)  # one identity for the whole stream
        loop = asyncio.get_running_loop()
        known = Known()  # the sessions the previous message named
        gone = False  # the call has ended (answered, cancelled or failed)

        def refused(error: Exception, call: _Call) -> asyncio.Future[bytes]:
            code, message = self._status("StreamBatch", call, error)
            fut: asyncio.Future[bytes] = loop.create_future()
            answer = pb.ObserveBatchResponse(error=pb.StreamError(code=code.value[0], message=message))
            fut.set_result(answer.SerializeToString())
            return fut

        def begin(req: BatchWire, msg: _Message) -> asyncio.Future[bytes]:
            """Begins a message's steps; a refusal is answered (and counted) at once."""
            call = msg.call
            assert call is not None
            msg.begun = True
            try:
                fut, _ = self._begin_batch("StreamBatch", req, owner, deadline, waiting, call, known)
            except Exception as e:
                fut = refused(e, call)
                msg.call = None  # counted already
            return fut

        def after(previous: asyncio.Future[bytes], req: BatchWire, msg: _Message) -> asyncio.Future[bytes]:
            """A pipelined message: begun once the previous one has its answer (its turns let go)."""
            fut: asyncio.Future[bytes] = loop.create_future()

            def copy(inner: asyncio.Future[bytes]) -> None:
                if fut.done():
                    return
                if inner.cancelled():
                    fut.cancel()
                else:
                    fut.set_result(inner.result())

            def go(_: asyncio.Future[bytes]) -> None:
                if gone:  # the stream has ended: nobody to answer, nothing to apply
                    fut.cancel()
                    return
                begin(req, msg).add_done_callback(copy)

            previous.add_done_callback(go)
            return fut

        def nudge(_: object = None) -> None:
            if wake is not None and not wake.done():
                wake.set_result(None)

        async def read() -> None:
            nonlocal unsent, ended
            last: _Message | None = None  # the previous message
            last_words = None  # and the ids it named
            try:
                async for req in request_iterator:
                    msg = _Message()
                    u = req.uniform(known)
                    if u is not None:
                        msg.steps = len(u.seqs)
                    if last is not None and last.answer is not None and not last.answer.done():
                        same = u is not None and u.words is last_words  # the same sessions, still stepping
                        if same or not last.begun:  # or the one before has not begun: keep the order
                            msg.answer = after(last.answer, req, msg)
                    if msg.answer is None:
                        msg.answer = begin(req, msg)
                        if msg.call is None:  # refused whole (answered already): counts one
                            msg.steps = 1
                    last, last_words = msg, None if u is None else u.words
                    unsent += msg.steps
                    lineup.append(msg)
                    if len(lineup) == 1:  # the writer may be waiting for a message: its answer wakes it
                        msg.answer.add_done_callback(nudge)
                    while unsent >= limit:  # backpressure: wait until the client has taken answers
                        room.clear()
                        await room.wait()
            except Exception as e:  # the transport failed under us: say so, then end
                log.warning("StreamBatch: reading requests failed: %s", e)
            finally:
                ended = True
                nudge()

        # the writer wakes once per answer it sends (not also once per message read)
        reader = asyncio.create_task(read())
        try:
            while True:
                head = lineup[0].answer if lineup else None
                if head is None or not head.done():
                    if head is None and ended:
                        break
                    wake = loop.create_future()
                    if head is not None:
                        head.add_done_callback(nudge)
                    await wake  # a message's answer, or the reader's end (nothing else resolves it)
                    continue
                msg = lineup.popleft()
                response = head.result()  # a cancelled answer ends the stream, as awaiting it did
                if msg.call is not None:  # a refusal is counted already (also one made by a pipelined begin)
                    self._count("StreamBatch", msg.call, grpc.StatusCode.OK)
                yield response
                unsent -= msg.steps
                if unsent < limit:
                    room.set()
        finally:
            gone = True
            reader.cancel()
            _give_up(waiting)  # the stream is gone: give up its places in line

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def handle(call: _Call) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[self._info(mv) for mv in self.repo.versions()])

        return await self._call("ListModels", context, handle, request)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def handle(call: _Call) -> pb.ModelInfo:
            mv = self._resolve(request.name, request.version)
            call.model = mv.name
            return self._info(mv)

        return await self._call("GetModel", context, handle, request)  # type: ignore[no-any-return]

    def _info(self, mv: ModelVersion) -> pb.ModelInfo:
        m = mv.runtime.manifest

        def scores(evaluation: Any) -> list[pb.ForecastScore]:
            if evaluation is None:
                return []
            return [
                pb.ForecastScore(forecaster=k, mae=s.mae, rmse=s.rmse, smape=s.smape, mase=s.mase)
                for k, s in evaluation.scores.items()
            ]

        return pb.ModelInfo(
            name=m.name,
            version=m.version,
            is_default=self.repo.default_version(m.name) == m.version,
            cell=m.cell,
            layers=m.layers,
            hidden_size=m.hidden_size,
            features=m.features,
            targets=m.targets,
            context_length=m.context_length,
            horizon=m.horizon,
            provider=mv.runtime.provider,
            test_metrics=scores(m.evaluation),
            mase_season=m.evaluation.mase_season,
            input_form=m.input_form,
            created=m.created.isoformat(),
            onnx_sha256=m.onnx.sha256,
            live_sessions=mv.pool.used,
            warnings=m.warnings,
            beats_baselines=m.beats_baselines,
            quantiles=m.quantiles,
            validation_metrics=scores(m.validation),
            step=m.step,
            seasons=m.seasons,
        )
