"""The ASGI application: Starlette routes around the Strawberry schema (see ``factory.py``)."""

from stockledger.app.factory import (
    DatabaseNotMigratedError,
    LifespanHook,
    ReadinessCheck,
    check_revision,
    create_app,
)

__all__ = [
    "DatabaseNotMigratedError",
    "LifespanHook",
    "ReadinessCheck",
    "check_revision",
    "create_app",
]
