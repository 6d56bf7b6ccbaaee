"""The per-request GraphQL context: the services, the caller and the request's DataLoaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from strawberry.dataloader import DataLoader

from stockledger.domain.access import ApiKey, Scope
from stockledger.resolvers import convert
from stockledger.schema import ReservationLine
from stockledger.services.api_keys import ApiKeys
from stockledger.services.queries import InventoryQueries
from stockledger.services.writes import InventoryService


@dataclass
class GraphQLContext:
    """What resolvers see as ``info.context``.

    ``reservation_lines`` loads the lines of many reservations in one query (per request, so
    its cache never outlives the request); it is made on first use, since most requests
    (a reserve, a balance) never load lines.
    """

    service: InventoryService
    queries: InventoryQueries
    request: Any = None
    response: Any = None
    # The key the request authenticated with (None with STOCKLEDGER_AUTH=off) and the
    # scopes it acts with (every scope when auth is off).
    api_key: ApiKey | None = None
    scopes: frozenset[Scope] = frozenset(Scope)
    # The key store (``createApiKey`` and the like); when not given, the app's
    # (``app.state.api_keys``, the one the auth middleware reads).
    key_store: ApiKeys | None = None
    _lines: DataLoader[int, list[ReservationLine]] | None = field(default=None, init=False)

    @property
    def api_keys(self) -> ApiKeys:
        """The key store: :attr:`key_store`, else the app's ``app.state.api_keys``."""
        if self.key_store is None:
            self.key_store = self.request.app.state.api_keys
        return self.key_store

    @property
    def org(self) -> str:
        """The org the caller acts for: its key's, or with no key (``STOCKLEDGER_AUTH=off``,
        every request ADMIN of the served org, ARCHITECTURE section 13) the service's."""
        return self.api_key.org if self.api_key is not None else self.service.org_id

    @property
    def reservation_lines(self) -> DataLoader[int, list[ReservationLine]]:
        if self._lines is None:
            queries = self.queries

            async def load_lines(ids: list[int]) -> list[list[ReservationLine]]:
                by_id = await queries.lines_for(ids)
                return [[convert.reservation_line(ln) for ln in by_id.get(i, ())] for i in ids]

            self._lines = DataLoader(load_fn=load_lines)
        return self._lines
