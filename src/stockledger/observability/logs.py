"""Structured logs with structlog: JSON lines when not on a terminal, readable when on one.

``configure_logging(level, fmt)`` sets up structlog and routes the standard library's logging
(uvicorn, SQLAlchemy, ours) through the same renderer. Every line carries the process id
(``pid``: which worker wrote it). ``request_id`` is a context variable the HTTP layer binds per
request (``X-Request-ID``) and every line carries; ``caller`` likewise holds the API key a request
authenticated with, so every line written for it names the key (``api_key_id``,
``api_key_name``) and its ``org``, never the secret (ARCHITECTURE section 13).
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from typing import Any

import structlog

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# (key id, key name, org) of the request's API key; None without one (STOCKLEDGER_AUTH=off).
caller: ContextVar[tuple[int, str, str] | None] = ContextVar("caller", default=None)


def _add_request_id(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    rid = request_id.get()
    if rid is not None and "request_id" not in event:
        event["request_id"] = rid
    return event


def _add_caller(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    who = caller.get()
    if who is not None:
        event.setdefault("api_key_id", who[0])
        event.setdefault("api_key_name", who[1])
        event.setdefault("org", who[2])
    return event


def _add_pid(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["pid"] = os.getpid()
    return event


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging once per process.

    ``fmt``: ``json``, ``console``, or ``auto`` (console on a TTY, JSON otherwise).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        _add_caller,
        _add_pid,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # Filter first: a line below the level costs nothing past this check.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> Any:
    """A structlog logger bound to ``name``."""
    return structlog.get_logger(name)
