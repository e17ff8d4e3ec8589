"""The sink protocol the recorder writes batches to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from proxy.records import Entry


class Sink(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write(self, entries: Sequence[Entry]) -> None:
        """Write one batch; idempotent on the request id so a replay never duplicates."""
        ...

    async def close(self) -> None: ...
