"""Malformed bytes sent to the services gatecast does not write itself (health, reflection) answer
INVALID_ARGUMENT like its own methods, log no traceback, and leave the server serving."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DEFAULT_MODEL, RunningServer, server_settings

GARBAGE = b"\\xff\\xff\\x01"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, Path(repo) / "taylor")
    srv = RunningServer(server_settings(repo))
    yield srv.address
    srv.stop()


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/grpc.health.v1.Health/Check", "unary"),
        ("/grpc.health.v1.Health/Watch", "server-stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
    ],
)
def test_malformed_request_to_health_and_reflection(
    address: str, method: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with grpc.insecure_channel(address) as channel:
        raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        with pytest.raises(grpc.RpcError) as e:
            if kind == "unary":
                channel.unary_unary(method, **raw)(GARBAGE, timeout=5)
            elif kind == "server-stream":
                list(channel.unary_stream(method, **raw)(GARBAGE, timeout=5))
            else:
                list(channel.stream_stream(method, **raw)(iter([GARBAGE]), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "not a valid" in str(e.value.details())
        # grpc's own services: not pointed at gatecast's .proto files
        assert "against the service's .proto file" in str(e.value.details()), e.value.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not [r for r in caplog.records if r.exc_info], "a malformed request must not log a traceback"


def test_methods_that_do_not_exist_are_unimplemented_and_not_remembered(address: str) -> None:
    """Found by a hostile client: the interceptor kept a handler for every method path it was asked for, so
    a client naming new methods grew the server's memory without bound (about 70 MiB per 20,000 names)."""
    from service.servicer import TolerantDecoding

    names = [f"/bogus.Service{i}/Method" for i in range(20)]
    with grpc.insecure_channel(address) as channel:
        for name in names:
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(name, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
                    b"", timeout=5
                )
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # the same interceptor, driven directly: an unknown method (no handler) leaves nothing behind, a known one is
    # wrapped once
    interceptor = TolerantDecoding()

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    async def continuation(details: Details) -> object:
        if details.method.startswith("/bogus"):
            return None
        return grpc.unary_unary_rpc_method_handler(lambda request, context: request, request_deserializer=bytes)

    async def ask() -> list[object]:
        return [await interceptor.intercept_service(continuation, Details(n)) for n in [*names, "/grpc.X/Y"] * 2]

    answers = asyncio.run(ask())
    assert answers[: len(names)] == [None] * len(names)
    assert list(interceptor._wrapped) == ["/grpc.X/Y"]
