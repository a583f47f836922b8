"""Providers: where observations come from (Docker, the routes file), and the one narrow
interface they report through.

A provider knows nothing of the Watcher, the table or the workers: it pushes what it sees into
an `Observations` sink. Each provider names its `source`; a resync of one source replaces only
that source's items, so a second source (Swarm services beside Docker containers) never drops
the first one's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from edgeproxy.routes.model import Container
from edgeproxy.routes.table import FileRoute


class Observations(Protocol):
    """What providers report to (the control plane's Watcher implements it)."""

    def resync(self, items: Iterable[Container], source: str = "docker") -> None:
        """Replace every item of `source` with a fresh full list."""

    def update(self, item: Container, source: str = "docker") -> None:
        """One item of `source` changed or appeared."""

    def remove(self, item_id: str, source: str = "docker") -> None:
        """One item of `source` is gone."""

    def stopping(self, item_id: str) -> None:
        """A stop or kill arrived for `item_id`: no new requests, before it dies."""

    def started(self, item_id: str) -> None:
        """A (re)start arrived for `item_id`: a previous stop no longer applies."""

    def connected(self, up: bool, source: str = "docker") -> None:
        """The provider's connection to `source` came up (True) or went down (False)."""

    def observed_lag(self, seconds: float, source: str = "docker") -> None:
        """Time from an event at `source` to its observation being reported."""

    def set_file_routes(self, routes: Iterable[FileRoute]) -> None:
        """Replace the routes that come from the routes file."""
