"""``edgedeploy controller``: the store, the engine and the HTTP server in one long-running process.

Start-up fails fast with one line when the store or the broker cannot be reached (a typo in a URL
should not look like a hung service); once running, a broker that goes away is reconnected to by
the MQTT client, and a store that goes away makes ticks fail and be retried every second, the
state on disk being what was last written. Several controllers may share one PostgreSQL store:
the engine of each one tries to lead every second and only the leader acts (the others answer
the API with 503 and take over when the leader's database session ends, e.g. on ``kill -9``).

SIGTERM and SIGINT stop the HTTP server, let the engine flush what it holds and give up the lead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from edge_agent.broker_tls import redact_url
from edge_agent.errors import UsageError
from edge_agent.fleet_messages import DEFAULT_PREFIX
from packager.control.engine import CONTROLLER_MQTT, ControlPlane
from packager.control.store import Store

__all__ = ["DEFAULT_RETENTION_S", "run_controller"]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_S = 7 * 86400.0


def run_controller(store_url: str, broker_url: str, host: str = "127.0.0.1", port: int = 8090,
                   tokens: list[str] | None = None, retention_s: float = DEFAULT_RETENTION_S,
                   prefix: str = DEFAULT_PREFIX, mqtt_version: str = CONTROLLER_MQTT, home: Path | None = None) -> int:
    """Run the controller until SIGTERM/SIGINT; returns the exit code."""
    from aiohttp import web

    from packager.control.api import build_app

    if tokens is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise UsageError("--host: without --token-file the controller listens on loopback only "
                         "(its API can order every device); give a token file to listen on other addresses")
    if tokens is None:
        log.warning("no --token-file: the API and console are open to anyone on this machine")
    store = Store.open(store_url)
    plane = ControlPlane(store, broker_url, prefix=prefix, home=home, mqtt_version=mqtt_version,
                         retention_s=retention_s, holder=f"{socket.gethostname()}:{os.getpid()}")
    try:
        plane.start()
    except BaseException:
        store.close()
        raise

    async def serve() -> None:
        runner = web.AppRunner(build_app(plane, tokens), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UsageError(f"--port: cannot listen on {host}:{port} ({exc.strerror})") from None
        log.info("controller on http://%s:%d (store %s, broker %s)", host, port, store.url, redact_url(broker_url))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        plane.stop()
        store.close()
    return 0
