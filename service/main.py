"""`gatecast serve`: settings, the server, and signal handling.

SIGTERM, SIGINT and SIGHUP all drain: stop accepting, finish what is in flight, write the session
snapshot (when `snapshot_path` is set), exit 0. (SIGHUP does not reload: the repository is polled, and
settings are read only at start.)"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from . import loops
from .server import create_server
from .settings import Settings, load_settings

log = logging.getLogger(__name__)
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _serve(settings: Settings) -> int:
    app = create_server(settings)
    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in DRAIN_SIGNALS:  # before loading models: a signal during start-up drains too
        loop.add_signal_handler(sig, on_signal, sig)
    await app.start()
    await stop.wait()
    log.info("%s received: draining (grace %.1f s)", received[0], settings.shutdown_grace_s)
    try:
        await app.stop()
    except OSError as e:
        log.error("sessions were not saved: %s", e)
        return 1
    return 0


def serve(settings_file: Path | None = None, **overrides: object) -> int:
    settings = load_settings(settings_file, **overrides)
    return loops.run(_serve(settings), settings.event_loop)
