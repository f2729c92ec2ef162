"""`gatecast serve`: settings, the server, and SIGTERM/SIGINT handling."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from .server import create_server
from .settings import load_settings

log = logging.getLogger(__name__)


async def _serve(settings_file: Path | None, **overrides: object) -> None:
    settings = load_settings(settings_file, **overrides)
    app = create_server(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", settings.shutdown_grace_s)
    await app.stop()


def serve(settings_file: Path | None = None, **overrides: object) -> int:
    asyncio.run(_serve(settings_file, **overrides))
    return 0
