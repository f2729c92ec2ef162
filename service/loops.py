"""The event loop the server and its Forecast workers run on (the `event_loop` setting).

uvloop (libuv under asyncio's interface) runs the loop's own machinery (scheduling callbacks, waking
futures, polling) in compiled code; gRPC's aio layer and the batchers run on it unchanged. In A/Bs on the
benchmark machine it took 7-15% off the server's CPU per unary `Forecast` (README, Benchmarks). `auto`
takes it when it is installed (a dependency on Linux and macOS), else asyncio's own loop; `asyncio` forces
the standard loop; `uvloop` refuses to start without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

log = logging.getLogger(__name__)
T = TypeVar("T")
LoopChoice = Literal["auto", "uvloop", "asyncio"]
LOOP_CHOICES: tuple[str, ...] = get_args(LoopChoice)  # for command lines that take the same choice


@functools.cache
def uvloop_problem() -> str | None:
    """Why uvloop cannot run here, or None when it can."""
    try:
        import uvloop  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "uvloop":
            return "uvloop is not installed"
        return f"uvloop cannot be imported: {e}"
    except Exception as e:  # installed but broken: built for another Python, a missing library, ...
        return f"uvloop cannot be imported: {type(e).__name__}: {e}"
    return None


def resolve(choice: str) -> str:
    """The loop `choice` runs on: "uvloop" or "asyncio" (`auto`: uvloop when it can run, else asyncio's, with
    a warning when uvloop is installed but broken)."""
    if choice != "auto":
        return choice
    problem = uvloop_problem()
    if problem is None:
        return "uvloop"
    if problem != "uvloop is not installed":
        _warn_once(f"event_loop auto: {problem}; running on asyncio's loop")
    return "asyncio"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


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
