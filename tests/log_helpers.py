"""Logging helpers for the tests that read what the service logs.

``json_logging()`` switches to the served process's set-up (``configure_logging("INFO",
"json")``) for a block. Besides giving lines a test can parse, it keeps structlog's development
renderer from drawing every logged traceback with its locals, which takes seconds a line and
stalls the event loop during an outage's burst of logged failures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from stockledger.observability.logs import configure_logging


@contextmanager
def json_logging() -> Iterator[None]:
    """``configure_logging("INFO", "json")`` for the block (to the current, captured
    ``sys.stderr``), then the previous logging and structlog set-up back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    configure_logging("INFO", "json")
    # Same output; but keep module-level loggers from caching this set-up past the block.
    structlog.configure(cache_logger_on_first_use=False)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)


def write_lines(stderr: str) -> list[dict[str, Any]]:
    """The ``stockledger.writes`` lines of captured stderr (every line must be JSON)."""
    out = []
    for raw in stderr.splitlines():
        if not raw.strip():
            continue
        entry = json.loads(raw)  # JSON format: no line may be anything else
        if entry.get("logger") == "stockledger.writes":
            out.append(entry)
    return out
