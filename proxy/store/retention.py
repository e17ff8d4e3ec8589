"""`storage.retention_days`: decisions older than that are deleted, hourly, by the store's own loop."""

from __future__ import annotations

import asyncio
import logging

from proxy.common import cancel_and_wait, every
from proxy.store.base import LogStore

log = logging.getLogger("thermostat")


class RetentionPruner:
    """Prunes the decision log every `interval_s` (the first time an interval after start, not during start-up)."""

    def __init__(self, store: LogStore, retention_days: int, *, interval_s: float = 3600.0) -> None:
        self.store = store
        self.retention_days = retention_days
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def prune_expired(self) -> int:
        """Delete decisions older than `storage.retention_days` (0 keeps everything)."""
        days = self.retention_days
        if days <= 0:
            return 0
        try:
            deleted = await self.store.prune(days * 86_400.0)
        except Exception as exc:  # the store may be down; the next interval tries again
            log.warning("pruning the decision log failed: %s", exc)
            return 0
        if deleted:
            log.info("pruned %d decision(s) older than %d day(s)", deleted, days)
        return deleted

    def start(self) -> None:
        if self.retention_days > 0:
            self._task = every(self.interval_s, self.prune_expired, "thermostat-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
