"""``fluxrt serve``: the app on uvicorn in the foreground, until SIGTERM or SIGINT.

The server listens at once and loads the pipeline on a thread of its own (``/readyz`` 503 until it is warm).
SIGTERM: new requests are answered 503, every accepted one finishes, then the server exits 0 (at the latest
after ``DRAIN_S``).  SIGINT: the waiting requests are answered 503 at once, the running call is let finish as
long as ``INTERRUPT_S`` allows, and the server exits without a traceback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path

import uvicorn

from fluxrt.errors import FluxRTError
from fluxrt.serve.app import create_app
from fluxrt.serve.service import Service

DRAIN_S = 25.0  # SIGTERM: the longest the accepted requests are waited for
INTERRUPT_S = 5.0
BACKLOG = 2048  # connections the kernel holds before accept: bursts of clients are absorbed
log = logging.getLogger("fluxrt.serve")


class ServeError(FluxRTError):
    """The server cannot start as asked (flags, files, the model)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path | None, host: str) -> str | None:
    if path is None:
        if not is_loopback(host):
            raise ServeError(f"--host {host} listens beyond this machine: give --api-key-file FILE (a bearer token "
                             f"clients must send), or listen on 127.0.0.1")
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeError(f"--api-key-file {path} cannot be read: {e}") from None
    if len(key) < 16 or any(c.isspace() for c in key) or not key.isprintable():
        raise ServeError(f"--api-key-file {path} must hold one token of at least 16 printable characters without "
                         f"spaces (got {len(key)} characters)")
    return key


class Server(uvicorn.Server):
    """uvicorn's server with fluxrt's shutdown: SIGTERM drains, SIGINT interrupts; the signal is not raised
    again after shutdown (uvicorn's default), so SIGTERM exits 0."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.signalled_at: float | None = None
        self.limit = DRAIN_S

    def handle_exit(self, sig: int, frame) -> None:
        if self.signalled_at is not None:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self.signalled_at = time.monotonic()
        if sig == signal.SIGINT:
            self.limit = INTERRUPT_S
            self.service.interrupt()
        else:
            self.limit = DRAIN_S
            self.service.drain()

    async def on_tick(self, counter: int) -> bool:
        if self.service.state == "failed":
            return True
        if self.signalled_at is not None:
            if self.service.busy() == 0 or time.monotonic() - self.signalled_at > self.limit:
                return True
        return await super().on_tick(counter)


def serve(service: Service, host: str, port: int, api_key: str | None) -> int:
    """Run until a signal; 0 after a shutdown, 1 when the model failed to load."""
    logging.basicConfig(level=logging.INFO, format="fluxrt serve: %(message)s", stream=sys.stderr)
    config = uvicorn.Config(create_app(service, api_key), host=host, port=port, backlog=BACKLOG, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=int(INTERRUPT_S), lifespan="off")
    server = Server(config, service)
    service.loader.start()
    log.info("listening on http://%s:%d (loading %s)", host, port, service.model)
    try:
        server.run()  # uvicorn's loop: uvloop where it is installed (the serve extra), else asyncio's
    except KeyboardInterrupt:
        pass
    if service.state == "failed":
        raise ServeError(f"loading {service.model} failed: {service.error}")
    log.info("stopped")
    return 0
