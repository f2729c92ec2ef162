"""The Forecaster servicer: protobuf in, plain calls into the repository, batcher and sessions, protobuf
out. Errors are ours (service.errors) and become gRPC statuses in one place (`_call`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from gatecast.v1 import forecaster_pb2 as pb
from gatecast.v1 import forecaster_pb2_grpc as pb_grpc

from .convert import check_session_id, to_array, to_matrix
from .errors import InvalidArgument, NotFound, ServiceError
from .metrics import Metrics
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable
from .settings import Settings

log = logging.getLogger(__name__)


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
        else:
            request_id = uuid.uuid4().hex[:12]
            log.error("%s failed (request id %s)", rpc, request_id, exc_info=error)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        self._count(rpc, call, code)
        return code, message

    async def _call(
        self, rpc: str, context: grpc.aio.ServicerContext, handler: Callable[[_Call], Awaitable[Any]]
    ) -> Any:
        call = _Call()
        try:
            result = await handler(call)
        except asyncio.CancelledError:
            self._count(rpc, call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:
            await context.abort(*self._status(rpc, call, e))
        self._count(rpc, call, grpc.StatusCode.OK)
        return result

    # --- the work, transport-free but for the messages ----------------------------------------------

    def _start_step(
        self, session: Session, mv: ModelVersion, x: np.ndarray, deadline: float | None, seq: int | None
    ) -> asyncio.Future[np.ndarray] | np.ndarray:
        """For the holder of the session's turn: the stored forecast for a retry, else the future of the
        step. The turn passes on when the step has really finished (not when its caller stops waiting)."""
        try:
            if session.closed:
                raise NotFound(f"session {session.id!r} not found: it was closed")
            if seq is not None and session.check_sequence(seq):
                assert session.forecast is not None
                session.release()
                return session.forecast  # a retry: answered again, not applied twice
            commit = session.committer(seq, x.shape[0]) if seq is not None else None
            fut = mv.batcher.submit(x, session.slot, deadline, commit)
        except BaseException:
            session.release()
            raise
        fut.add_done_callback(lambda _: session.release())
        session.last_used = time.monotonic()
        return fut

    async def _step(
        self, session: Session, mv: ModelVersion, x: np.ndarray, deadline: float | None, seq: int | None
    ) -> np.ndarray:
        """Applies rows to a session's state in its turn, so two steps never overlap."""
        await session.take()
        started = self._start_step(session, mv, x, deadline, seq)
        if isinstance(started, np.ndarray):
            return started
        return await asyncio.shield(started)  # a cancelled caller does not cancel an applied step

    def _prepare_observe(self, req: pb.ObserveRequest, call: _Call) -> tuple[Session, ModelVersion, np.ndarray]:
        session = self.sessions.get(check_session_id(req.session_id))
        call.model = session.model
        if req.sequence == 0:
            raise InvalidArgument("sequence must be set: 1 for the first observation, then counting up by one")
        mv = session.mv
        x = to_array(req.rows, mv.runtime.manifest.n_features, "rows", self.settings.max_rows)
        return session, mv, x

    async def _observe(self, req: pb.ObserveRequest, deadline: float | None, call: _Call) -> pb.ObserveResponse:
        session, mv, x = self._prepare_observe(req, call)
        y = await self._step(session, mv, x, deadline, req.sequence)
        return pb.ObserveResponse(session_id=session.id, sequence=req.sequence, forecast=to_matrix(y))

    # --- RPCs -----------------------------------------------------------------------------------------

    async def Forecast(self, request: pb.ForecastRequest, context: grpc.aio.ServicerContext) -> pb.ForecastResponse:
        async def handle(call: _Call) -> pb.ForecastResponse:
            mv = self.repo.resolve(request.model, request.version)
            call.model = mv.name  # only loaded models become label values: clients cannot grow the metrics
            if not request.series:
                raise InvalidArgument("no series given; expected one or more histories (rows x features)")
            if len(request.series) > self.settings.max_series:
                raise InvalidArgument(
                    f"{len(request.series)} series in one request; at most {self.settings.max_series} are accepted"
                )
            n_f = mv.runtime.manifest.n_features
            xs = [to_array(s, n_f, f"series[{i}]", self.settings.max_rows) for i, s in enumerate(request.series)]
            deadline = _deadline(context)
            futures: list[asyncio.Future[np.ndarray]] = []
            try:
                for x in xs:
                    futures.append(mv.batcher.submit(x, None, deadline))
                ys = await asyncio.gather(*futures)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            return pb.ForecastResponse(model=mv.name, version=mv.version, forecasts=[to_matrix(y) for y in ys])

        return await self._call("Forecast", context, handle)  # type: ignore[no-any-return]

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        async def handle(call: _Call) -> pb.OpenSessionResponse:
            mv = self.repo.resolve(request.model, request.version)
            call.model = mv.name
            history = None
            if request.HasField("history") and request.history.rows > 0:
                history = to_array(request.history, mv.runtime.manifest.n_features, "history", self.settings.max_rows)
            session = self.sessions.open(mv)
            response = pb.OpenSessionResponse(session_id=session.id, model=mv.name, version=mv.version, next_sequence=1)
            if history is not None:
                try:
                    y = await self._step(session, mv, history, _deadline(context), None)
                except BaseException:
                    self.sessions.discard(session)
                    raise
                session.steps += history.shape[0]
                response.forecast.CopyFrom(to_matrix(y))
            return response

        return await self._call("OpenSession", context, handle)  # type: ignore[no-any-return]

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext) -> pb.ObserveResponse:
        async def handle(call: _Call) -> pb.ObserveResponse:
            return await self._observe(request, _deadline(context), call)

        return await self._call("Observe", context, handle)  # type: ignore[no-any-return]

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        async def handle(call: _Call) -> pb.CloseSessionResponse:
            session = await self.sessions.close(check_session_id(request.session_id))
            call.model = session.model
            return pb.CloseSessionResponse(session_id=session.id, steps=session.steps)

        return await self._call("CloseSession", context, handle)  # type: ignore[no-any-return]

    async def Stream(
        self, request_iterator: AsyncIterator[pb.ObserveRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """No task per message: each message takes a ticket for its session's turn, its step starts from
        the ticket's callback (at once when the session is free), and it is answered from the step's done
        callback. A session's answers are therefore queued in the order its steps applied."""
        out: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        waiting: dict[asyncio.Future[None], Session] = {}  # tickets of this stream not yet granted
        pending = 0
        reading = True
        deadline = _deadline(context)

        def answer(req: pb.ObserveRequest, call: _Call, y: np.ndarray | None, error: BaseException | None) -> None:
            nonlocal pending
            response = pb.StreamResponse(session_id=req.session_id, sequence=req.sequence)
            if error is None:
                assert y is not None
                response.forecast.CopyFrom(to_matrix(y))
                self._count("Stream", call, grpc.StatusCode.OK)
            else:
                code, message = self._status("Stream", call, error)
                response.error.code = code.value[0]
                response.error.message = message
            out.put_nowait(response)
            pending -= 1
            if not reading and pending == 0:
                out.put_nowait(None)

        def on_done(req: pb.ObserveRequest, call: _Call, fut: asyncio.Future[np.ndarray]) -> None:
            if fut.cancelled():
                answer(req, call, None, ServiceError("the step was cancelled"))
            elif (e := fut.exception()) is not None:
                answer(req, call, None, e)
            else:
                answer(req, call, fut.result(), None)

        def start(req: pb.ObserveRequest, call: _Call, session: Session, mv: ModelVersion, x: np.ndarray) -> None:
            try:
                started = self._start_step(session, mv, x, deadline, req.sequence)
            except Exception as e:
                answer(req, call, None, e)
                return
            if isinstance(started, np.ndarray):
                answer(req, call, started, None)
            else:
                started.add_done_callback(lambda f: on_done(req, call, f))

        def granted(
            ticket: asyncio.Future[None],
            req: pb.ObserveRequest,
            call: _Call,
            session: Session,
            mv: ModelVersion,
            x: np.ndarray,
        ) -> None:
            waiting.pop(ticket, None)
            if not ticket.cancelled():
                start(req, call, session, mv, x)

        def handle(req: pb.ObserveRequest) -> None:
            nonlocal pending
            pending += 1
            call = _Call()
            try:
                session, mv, x = self._prepare_observe(req, call)
            except Exception as e:
                answer(req, call, None, e)
                return
            ticket = session.queue_turn()  # now, so that a later message cannot overtake this one
            if ticket.done():
                start(req, call, session, mv, x)
            else:
                waiting[ticket] = session
                ticket.add_done_callback(lambda t: granted(t, req, call, session, mv, x))

        async def read() -> None:
            nonlocal reading
            try:
                async for req in request_iterator:
                    handle(req)
            finally:
                reading = False
                if pending == 0:
                    out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for ticket, session in list(waiting.items()):  # the stream is gone: give up its places in line
                if not ticket.done():  # a granted ticket's callback still starts (and later releases) its step
                    session.drop(ticket)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def handle(call: _Call) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[self._info(mv) for mv in self.repo.versions()])

        return await self._call("ListModels", context, handle)  # type: ignore[no-any-return]

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def handle(call: _Call) -> pb.ModelInfo:
            mv = self.repo.resolve(request.name, request.version)
            call.model = mv.name
            return self._info(mv)

        return await self._call("GetModel", context, handle)  # type: ignore[no-any-return]

    def _info(self, mv: ModelVersion) -> pb.ModelInfo:
        m = mv.runtime.manifest
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
            test_metrics=[
                pb.ForecastScore(forecaster=k, mae=s.mae, rmse=s.rmse, smape=s.smape, mase=s.mase)
                for k, s in m.evaluation.scores.items()
            ],
            mase_season=m.evaluation.mase_season,
            input_form=m.input_form,
            created=m.created.isoformat(),
            onnx_sha256=m.onnx.sha256,
            live_sessions=mv.pool.used,
        )
