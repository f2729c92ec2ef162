"""The event loop the server and its Forecast workers run on (the `event_loop` setting).

uvloop (libuv under asyncio's interface) runs the loop's own machinery (scheduling callbacks, waking
futures, polling) in compiled code; gRPC's aio layer and the batchers run on it unchanged. In A/Bs on the
benchmark machine it took 7-15% off the server's CPU per unary `Forecast` (README, Benchmarks). `auto`
takes it when it is installed (a dependency on Linux and macOS), else asyncio's own loop; `asyncio` forces
the standard loop; `uvloop` refuses to start without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopChoice = Literal["auto", "uvloop", "asyncio"]


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str) -> str:
    """The loop `choice` runs on: "uvloop" or "asyncio" (`auto`: uvloop when installed)."""
    if choice == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop of the kind `choice` resolves to."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on a loop of the kind `choice` resolves to."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def kind(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio": what a running loop is."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"
