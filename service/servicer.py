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
from typing import Any

import grpc
import numpy as np

from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

from .auth import caller_identity
from .batcher import Output
from .convert import check_session_id, quote, to_array, to_matrix, to_quantile_matrix
from .errors import InvalidArgument, NotFound, ServiceError
from .metrics import Metrics
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable, rows_digest
from .settings import Settings

log = logging.getLogger(__name__)

MAX_MODEL_NAME = 64  # the manifest's limit: a longer name cannot be loaded
MAX_MESSAGE = 1024  # an error message is never longer than this
DEFAULT_STREAM_INFLIGHT = 256


class Malformed:
    """A request whose bytes did not decode."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def problem(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.type_name} message ({quote(self.error, 120)}); "
            "check the client's generated code against proto/gatecast/v1"
        )


def _tolerant(decode: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as e:  # protobuf DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(type_name, str(e) or type(e).__name__)

    return deserialize


class _Capture:
    """Stands in for a server to read the handlers the generated code would register."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.name, self.handlers = name, handlers


def add_to_server(servicer: ForecasterServicer, server: grpc.aio.Server) -> None:
    """What `add_ForecasterServicer_to_server` does, with request deserializers that never raise."""
    capture = _Capture()
    pb_grpc.add_ForecasterServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    service = pb.DESCRIPTOR.services_by_name["Forecaster"]
    handlers = {}
    for method, handler in capture.handlers.items():
        input_type = service.methods_by_name[method].input_type.full_name
        decode = handler.request_deserializer
        assert decode is not None
        handlers[method] = handler._replace(request_deserializer=_tolerant(decode, input_type))  # type: ignore[attr-defined]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.name, handlers),))
    server.add_registered_method_handlers(capture.name, handlers)


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
            wrapped = self._wrapped[method] = self._wrap(method, await continuation(details))
        return wrapped

    @staticmethod
    def _wrap(method: str, handler: Any) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        tolerant = _tolerant(handler.request_deserializer, method.rsplit("/", 1)[-1] + " request")

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


class _Call:
    """Per-request bookkeeping: the model label for metrics is known only once the request is read."""

    __slots__ = ("model", "start")

    def __init__(self) -> None:
        self.model = ""
        self.start = time.monotonic()


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ForecasterServicer(pb_grpc.ForecasterServicer):
    def __init__(self, settings: Settings, repo: Repository, sessions: SessionTable, metrics: Metrics) -> None:
        self.settings = settings
        self.repo = repo
        self.sessions = sessions
        self.metrics = metrics
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}

    # --- accounting and error mapping, in one place -------------------------------------------------

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

    def _status(self, rpc: str, call: _Call, error: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status for an error, counted: ours carry their code; anything else is logged with a request
        id and answered INTERNAL without its text."""
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
                self.metrics.malformed.labels(rpc).inc()
                raise request.problem()
            result = await handler(call)
        except asyncio.CancelledError:
            self._count(rpc, call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            await context.abort(*self._status(rpc, call, e))
        self._count(rpc, call, grpc.StatusCode.OK)
        return result

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
            fut = mv.batcher.submit(x, session.slot, deadline, commit)
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
        session, mv, x = self._prepare_observe(req, call, owner)
        out = await self._step(session, mv, x, deadline, req.sequence)
        response = pb.ObserveResponse(session_id=session.id, sequence=req.sequence, forecast=to_matrix(out.y))
        if out.q is not None:
            response.quantile_forecast.CopyFrom(to_quantile_matrix(out.q))
        return response

    def _begin(
        self,
        req: pb.ObserveRequest,
        call: _Call,
        owner: str | None,
        deadline: float | None,
        reply: Callable[[Output | None, BaseException | None], None],
        waiting: dict[asyncio.Future[None], Session],
    ) -> None:
        """Takes the step's turn now (so that no later message overtakes it), starts the step when the turn
        comes and calls `reply(result, error)` exactly once, all from callbacks: no task per step. A ticket
        not yet granted waits in `waiting`, for a caller that goes away to give up (`_give_up`)."""
        try:
            session, mv, x = self._prepare_observe(req, call, owner)
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

    def _begin_batch(
        self,
        rpc: str,
        req: pb.ObserveBatchRequest,
        owner: str | None,
        deadline: float | None,
        waiting: dict[asyncio.Future[None], Session],
        outer: _Call,
    ) -> asyncio.Future[pb.ObserveBatchResponse]:
        """Begins every step of a batch, in request order (steps of one session apply in that order); the
        future resolves to the answer once each step has its result. Raises for a batch refused whole.
        Metrics count each message once (OK) and each step's error by its code."""
        n, limit = len(req.steps), self.settings.max_batch_steps
        if n == 0:
            raise InvalidArgument("no steps given; expected one or more ObserveRequest in `steps`")
        if n > limit:
            raise InvalidArgument(
                f"{n} steps in one message; at most {limit} are accepted (GATECAST_MAX_BATCH_STEPS): split it"
            )
        response = pb.ObserveBatchResponse()
        results = [response.results.add() for _ in range(n)]
        done: asyncio.Future[pb.ObserveBatchResponse] = asyncio.get_running_loop().create_future()
        left = n

        def replier(r: pb.StreamResponse, step: pb.ObserveRequest, call: _Call) -> Callable[..., None]:
            def reply(result: Output | None, error: BaseException | None) -> None:
                nonlocal left
                r.session_id, r.sequence = step.session_id, step.sequence
                if error is None:
                    assert result is not None
                    r.forecast.CopyFrom(to_matrix(result.y))
                    if result.q is not None:
                        r.quantile_forecast.CopyFrom(to_quantile_matrix(result.q))
                    outer.model = outer.model or call.model
                else:
                    code, message = self._status(rpc, call, error)
                    r.error.code, r.error.message = code.value[0], message
                left -= 1
                if left == 0 and not done.done():
                    done.set_result(response)

            return reply

        for r, step in zip(results, req.steps, strict=True):
            call = _Call()
            self._begin(step, call, owner, deadline, replier(r, step, call), waiting)
        return done

    # --- RPCs -----------------------------------------------------------------------------------------

    async def Forecast(self, request: pb.ForecastRequest, context: grpc.aio.ServicerContext) -> pb.ForecastResponse:
        async def handle(call: _Call) -> pb.ForecastResponse:
            mv = self._resolve(request.model, request.version)
            call.model = mv.name  # only loaded models become label values: clients cannot grow the metrics
            if not request.series:
                raise InvalidArgument("no series given; expected one or more histories (rows x features)")
            if len(request.series) > self.settings.max_series:
                raise InvalidArgument(
                    f"{len(request.series)} series in one request; at most {self.settings.max_series} are accepted"
                )
            mv.batcher.check_request_rows(sum(s.rows for s in request.series))  # before converting anything
            n_f = mv.runtime.manifest.n_features
            xs = [to_array(s, n_f, f"series[{i}]", self.settings.max_rows) for i, s in enumerate(request.series)]
            futures = mv.batcher.submit_many(xs, None, _deadline(context))
            try:
                outs = await asyncio.gather(*futures)
            except BaseException:
                for f in futures:
                    f.cancel()  # the batcher drops what has not run yet
                raise
            m = mv.runtime.manifest
            response = pb.ForecastResponse(
                model=mv.name, version=mv.version, forecasts=[to_matrix(o.y) for o in outs], quantiles=m.quantiles
            )
            if m.onnx.quantile_output:
                response.quantile_forecasts.extend(to_quantile_matrix(o.q) for o in outs if o.q is not None)
            return response

        return await self._call("Forecast", context, handle, request)  # type: ignore[no-any-return]

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        async def handle(call: _Call) -> pb.OpenSessionResponse:
            mv = self._resolve(request.model, request.version)
            call.model = mv.name
            m = mv.runtime.manifest
            history = None
            # an empty matrix is no history; rows 0 beside values is a matrix that lies about its size
            if request.HasField("history") and (request.history.rows > 0 or request.history.values):
                mv.batcher.check_request_rows(request.history.rows)
                history = to_array(request.history, m.n_features, "history", self.settings.max_rows)
            rows = 0 if history is None else int(history.shape[0])
            session = self.sessions.open(mv, caller_identity(context, self.settings))  # owner: see service.auth
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
                session.steps += rows
                response.forecast.CopyFrom(to_matrix(out.y))
                if out.q is not None:
                    response.quantile_forecast.CopyFrom(to_quantile_matrix(out.q))
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
        self, request_iterator: AsyncIterator[pb.ObserveRequest | Malformed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """No task per message: each message takes a ticket for its session's turn, its step starts from
        the ticket's callback (at once when the session is free), and it is answered from the step's done
        callback.

        Each message gets a place in its session's line (keyed by the session id it names) when it is read;
        an answer, forecast or error, leaves only when every earlier message of that session has been
        answered, so one session's answers come in its message order. At most `max_stream_inflight`
        messages are read and not yet sent: beyond that the stream stops reading, and a client that never
        reads its answers is held back by flow control instead of growing the server's buffers."""
        out: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        lines: dict[str, deque[list[pb.StreamResponse | None]]] = {}  # per session id, in message order
        waiting: dict[asyncio.Future[None], Session] = {}  # tickets of this stream not yet granted
        limit = getattr(self.settings, "max_stream_inflight", DEFAULT_STREAM_INFLIGHT)
        pending = 0  # read, not yet queued for sending
        unsent = 0  # read, not yet sent
        room = asyncio.Event()
        room.set()
        reading = True
        deadline = _deadline(context)
        owner = caller_identity(context, self.settings)  # one identity for the whole stream

        def answer(
            key: str,
            place: list[pb.StreamResponse | None],
            req: pb.ObserveRequest,
            call: _Call,
            result: Output | None,
            error: BaseException | None,
        ) -> None:
            nonlocal pending
            response = pb.StreamResponse(session_id=req.session_id, sequence=req.sequence)
            if error is None:
                assert result is not None
                response.forecast.CopyFrom(to_matrix(result.y))
                if result.q is not None:
                    response.quantile_forecast.CopyFrom(to_quantile_matrix(result.q))
                self._count("Stream", call, grpc.StatusCode.OK)
            else:
                code, message = self._status("Stream", call, error)
                response.error.code = code.value[0]
                response.error.message = message
            place[0] = response
            line = lines[key]
            while line and line[0][0] is not None:
                out.put_nowait(line.popleft()[0])
                pending -= 1
            if not line:
                del lines[key]
            if not reading and pending == 0:
                out.put_nowait(None)

        def handle(req: pb.ObserveRequest | Malformed) -> None:
            nonlocal pending
            pending += 1
            call = _Call()
            if isinstance(req, Malformed):
                self.metrics.malformed.labels("Stream").inc()
                key, error = "", req.problem()
                req = pb.ObserveRequest()
            else:
                key, error = req.session_id, None
            place: list[pb.StreamResponse | None] = [None]
            lines.setdefault(key, deque()).append(place)
            if error is not None:
                answer(key, place, req, call, None, error)
                return
            step = req
            self._begin(step, call, owner, deadline, lambda r, e: answer(key, place, step, call, r, e), waiting)

        async def read() -> None:
            nonlocal reading, unsent
            try:
                async for req in request_iterator:
                    unsent += 1
                    handle(req)
                    while unsent >= limit:  # backpressure: wait until the client has taken answers
                        room.clear()
                        await room.wait()
            except Exception as e:  # the transport failed under us: say so, then end
                log.warning("Stream: reading requests failed: %s", e)
            finally:
                reading = False
                if pending == 0:
                    out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
                unsent -= 1
                if unsent < limit:
                    room.set()
        finally:
            reader.cancel()
            _give_up(waiting)  # the stream is gone: give up its places in line

    async def ObserveBatch(
        self, request: pb.ObserveBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ObserveBatchResponse:
        async def handle(call: _Call) -> pb.ObserveBatchResponse:
            waiting: dict[asyncio.Future[None], Session] = {}
            owner = caller_identity(context, self.settings)
            done = self._begin_batch("ObserveBatch", request, owner, _deadline(context), waiting, call)
            try:
                return await done  # started steps apply even if the caller goes: they answer nobody
            except asyncio.CancelledError:
                _give_up(waiting)
                raise

        return await self._call("ObserveBatch", context, handle, request)  # type: ignore[no-any-return]

    async def StreamBatch(
        self, request_iterator: AsyncIterator[pb.ObserveBatchRequest | Malformed], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ObserveBatchResponse]:
        """ObserveBatch on a stream, one answer per message in message order. A message's steps take their
        sessions' turns when it is read, so steps apply in arrival order across messages too. The stream
        reads on while fewer than `max_stream_inflight` steps are unanswered (a refused message counts one)."""
        answers: asyncio.Queue[tuple[asyncio.Future[pb.ObserveBatchResponse], int, _Call] | None] = asyncio.Queue()
        waiting: dict[asyncio.Future[None], Session] = {}  # tickets of this stream not yet granted
        limit = getattr(self.settings, "max_stream_inflight", DEFAULT_STREAM_INFLIGHT)
        unsent = 0  # steps read, not yet answered
        room = asyncio.Event()
        deadline = _deadline(context)
        owner = caller_identity(context, self.settings)  # one identity for the whole stream
        loop = asyncio.get_running_loop()

        def refused(error: Exception, call: _Call) -> asyncio.Future[pb.ObserveBatchResponse]:
            code, message = self._status("StreamBatch", call, error)
            fut: asyncio.Future[pb.ObserveBatchResponse] = loop.create_future()
            fut.set_result(pb.ObserveBatchResponse(error=pb.StreamError(code=code.value[0], message=message)))
            return fut

        async def read() -> None:
            nonlocal unsent
            try:
                async for req in request_iterator:
                    call = _Call()
                    if isinstance(req, Malformed):
                        self.metrics.malformed.labels("StreamBatch").inc()
                        fut, n = refused(req.problem(), call), 1
                    else:
                        n = max(1, len(req.steps))
                        try:
                            fut = self._begin_batch("StreamBatch", req, owner, deadline, waiting, call)
                        except Exception as e:
                            fut = refused(e, call)
                    unsent += n
                    answers.put_nowait((fut, n, call))
                    while unsent >= limit:  # backpressure: wait until the client has taken answers
                        room.clear()
                        await room.wait()
            except Exception as e:  # the transport failed under us: say so, then end
                log.warning("StreamBatch: reading requests failed: %s", e)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                fut, n, call = item
                response = await fut
                if not response.HasField("error"):
                    self._count("StreamBatch", call, grpc.StatusCode.OK)
                yield response
                unsent -= n
                if unsent < limit:
                    room.set()
        finally:
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
