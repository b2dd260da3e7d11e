"""Running the application under uvicorn: the listening socket, the log line naming it, and a shutdown
that drains.

:func:`bind` opens the socket before the model loads (a port in use fails at once); :func:`run` serves
the app on it until SIGTERM or SIGINT, then — uvicorn's graceful shutdown — stops accepting connections,
waits for the requests in flight (at most ``drain_timeout`` seconds, then cancels them), runs the app's
lifespan shutdown (which stops the engine) and returns, so that the process ends with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from typing import Iterator

import uvicorn

__all__ = ["bind", "run"]

log = logging.getLogger("minicpmv_jax.server")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: one the system picks). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def run(app, sock: socket.socket, *, drain_timeout: float, name: str = "the model") -> None:
    """Serves ``app`` on ``sock`` until SIGTERM / SIGINT, then drains (see the module docstring)."""
    server = _Server(uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout, log_level="info"))
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d", name, f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn's server, except that it returns after a SIGTERM / SIGINT shutdown (uvicorn raises the
    signal again once shut down, so that the process ends as killed by it: status -15, not 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
