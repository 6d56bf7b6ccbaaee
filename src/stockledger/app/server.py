"""How ``stockledger serve`` runs uvicorn: one JSON log format, and a shutdown with a bound.

- uvicorn's own loggers go through structlog's stdlib bridge (``log_config=None``: uvicorn
  leaves logging alone, and its lines reach the root handler that
  :func:`~stockledger.observability.logs.configure_logging` installed), so every line is one
  format.
- SIGTERM (or SIGINT) first lets in-flight requests finish, for up to half of
  ``shutdown_timeout_seconds``; then the lifespan stops the sweeper and lets the write batches
  finish (a quarter of it each). Should anything still hang (a call that never answers), the
  watchdog that the signal started (:func:`shutdown_watchdog`) ends the process once the whole
  bound has passed, with exit code :data:`SHUTDOWN_TIMED_OUT`.
- A port already in use ends the process at once with exit code 3 (uvicorn's startup failure).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from stockledger.config import Settings
from stockledger.observability.logs import get_logger

log = get_logger(__name__)

SHUTDOWN_TIMED_OUT = 70  # EX_SOFTWARE: the bound passed with work still running


def run(settings: Settings, *, host: str, port: int, workers: int) -> None:
    """Serve ``stockledger.cli:app_factory`` with uvicorn (uvloop, httptools) until a signal.

    Exits the process with code 3 when the server could not start (e.g. the port is in use).
    """
    uvicorn.run(
        "stockledger.cli:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,  # ours carries the request id and the GraphQL operation
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_seconds / 2)),
        limit_concurrency=settings.max_connections,  # past it, new requests get 503
        # A websocket message (a subscribe) is bounded as a request body is (default 16 MiB).
        ws_max_size=settings.max_body_bytes,
    )


@contextlib.contextmanager
def shutdown_watchdog(bound_seconds: float) -> Iterator[None]:
    """While entered (from the app's lifespan, in uvicorn's main thread, where uvicorn has
    put its own SIGTERM and SIGINT handlers): the first such signal also starts a timer that
    ends the process :data:`SHUTDOWN_TIMED_OUT` after ``bound_seconds``, whatever is still
    running. uvicorn's handler is called as before. Outside the main thread (tests running
    the app in-process) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    started: list[threading.Timer] = []
    previous: dict[int, Any] = {}

    def give_up() -> None:
        log.error(
            f"shutdown took longer than {bound_seconds:g} s "
            "(STOCKLEDGER_SHUTDOWN_TIMEOUT_SECONDS): exiting"
        )
        sys.stderr.flush()
        os._exit(SHUTDOWN_TIMED_OUT)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if not started:
            timer = threading.Timer(bound_seconds, give_up)
            timer.daemon = True
            timer.start()
            started.append(timer)
        handler = previous.get(sig)
        if callable(handler):
            handler(sig, frame)

    for handled in (signal.SIGTERM, signal.SIGINT):
        previous[handled] = signal.signal(handled, on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            # Only if still ours: uvicorn restores its originals on the way out itself.
            if signal.getsignal(number) is on_signal:
                signal.signal(number, handler)
