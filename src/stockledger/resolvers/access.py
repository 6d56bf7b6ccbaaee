"""The scope each root field needs (ARCHITECTURE section 13), as Strawberry permission classes.

A field the caller's key has no scope for is a field error with ``extensions.code:
"FORBIDDEN"`` naming the scope; null propagates as the GraphQL spec says (a non-null root
field makes ``data`` null), and a refused mutation ran nothing (Strawberry checks before the
resolver). The caller's effective scopes are ``info.context.scopes``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from strawberry.permission import BasePermission

from stockledger.domain.access import Scope


class _ScopePermission(BasePermission):
    scope: ClassVar[Scope]
    error_extensions = {"code": "FORBIDDEN"}

    def has_permission(self, source: Any, info: Any, **kwargs: Any) -> bool:
        return self.scope in info.context.scopes


@functools.cache
def needs(scope: Scope) -> type[BasePermission]:
    """The permission class of ``scope``: for ``permission_classes=[needs(Scope.X)]``."""
    return type(
        f"Needs{scope.value.title().replace('_', '')}",
        (_ScopePermission,),
        {"scope": scope, "message": f"this key has no {scope.value} scope"},
    )
