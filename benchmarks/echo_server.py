"""The ceiling: a bare grpc.aio server answering every call with pre-built bytes.

`Unary` answers each request with `unary` bytes; `Bidi` answers each message of a stream with `bidi`
bytes (benchmarks/throughput.py passes gatecast's own answers). No parsing, no model: what gRPC and the
event loop alone cost for gatecast's payloads. It runs on the kind of event loop `--loop` names, chosen as
gatecast's `event_loop` setting chooses (benchmarks/throughput.py gives both the same). Prints
`listening on <port>` once bound.

    python -m benchmarks.echo_server --unary-hex 0a0562656e6368 --bidi-hex 0a20... [--loop asyncio]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc

from gatecast.service import loops

SERVICE = "bench.Echo"


def handlers(unary: bytes, bidi: bytes) -> grpc.GenericRpcHandler:
    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return unary

    async def answer_each(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield bidi

    # no (de)serializers: bytes in, bytes out
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(answer),
            "Bidi": grpc.stream_stream_rpc_method_handler(answer_each),
        },
    )


async def serve(unary: bytes, bidi: bytes) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handlers(unary, bidi),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--unary-hex", required=True, help="every unary answer, hex encoded")
    ap.add_argument("--bidi-hex", required=True, help="every stream answer, hex encoded")
    ap.add_argument("--loop", choices=loops.LOOP_CHOICES, default="auto", help="the event loop")
    args = ap.parse_args()
    loops.run(serve(bytes.fromhex(args.unary_hex), bytes.fromhex(args.bidi_hex)), args.loop)


if __name__ == "__main__":
    main()
