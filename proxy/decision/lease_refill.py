"""The background side of budget leases: the only place that talks to the store about them.

`guards.lease.LeaseBook` admits requests from local leases; this task tops them up,
reports usage, returns what is not needed, and keeps the waiver list fresh, so the
request path never waits on Redis. It runs every ``caws.lease_refill_s`` and at once
when a request found its lease short. A call may take up to half a lease's lifetime:
a reconnect to a slow Redis is several round trips (CLIENT SETINFO, SETNAME, the
script), and cutting it short at ``redis_timeout_s`` only starts the next reconnect. A call that fails or times out only means no
new lease this round: the book keeps admitting from what it holds until the lease
expires, and the next round repeats the (idempotent) report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from guards.budget import BudgetGuard
from guards.lease import LeaseBook
from guards.state import LeaseCall, StateStore

log = logging.getLogger("thermostat.lease")


class LeaseRefiller:
    def __init__(
        self,
        guard: BudgetGuard,
        book: LeaseBook,
        store: StateStore,
        *,
        clock: Callable[[], float],
        call_timeout_s: float,
    ) -> None:
        self.guard = guard
        self.book = book
        self.store = store
        self.clock = clock
        self.interval_s = guard.settings.lease_refill_s
        self.call_timeout_s = call_timeout_s
        self.failures = 0  # store calls that got no answer (for tests and logs)
        self._task: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._waivers: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="thermostat-lease-refill")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the loop and hand every unused lease back (bounded; the store reclaims the rest at expiry)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(timeout_s):
                if self._calls:
                    await asyncio.gather(*self._calls, return_exceptions=True)
                await self.tick(closing=True)
        except TimeoutError:
            log.warning("returning budget leases at shutdown timed out; the store reclaims them at expiry")
        for task in self._calls:
            task.cancel()

    async def _run(self) -> None:
        last_waivers = float("-inf")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self.book.wakeup.wait()
            self.book.wakeup.clear()
            try:
                self.launch(self.clock())
            except Exception:  # noqa: BLE001 - the loop must outlive any single round
                log.exception("budget lease round failed")
            now = self.clock()
            if now - last_waivers >= self.interval_s and (self._waivers is None or self._waivers.done()):
                last_waivers = now
                self._waivers = asyncio.create_task(self._refresh_waivers(now))

    def launch(self, now: float, closing: bool = False) -> list[asyncio.Task[None]]:
        """Start one call per lease that needs one, without waiting: a slow call for one key
        (a reconnect to a slow Redis) must not hold back the others or the next round."""
        tasks = [asyncio.create_task(self._call(call)) for call in self.book.plan(now, closing=closing)]
        for task in tasks:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        return tasks

    async def tick(self, closing: bool = False) -> None:
        """One round, waited for (shutdown and tests)."""
        tasks = self.launch(self.clock(), closing=closing)
        if tasks:
            await asyncio.gather(*tasks)

    async def _refresh_waivers(self, now: float) -> None:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                await self.guard.refresh_waivers(now)
        except Exception as exc:  # noqa: BLE001 - the old list stays in use
            log.debug("waiver refresh failed: %s", exc)

    async def _call(self, call: LeaseCall) -> None:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                grant = await self.store.budget_lease(call, now=call.sent_at)
        except Exception as exc:  # noqa: BLE001 - a failed call is repeated next round
            self.failures += 1
            self.book.failed(call)
            log.debug("budget lease call for %s failed: %r", call.key, exc)
            return
        self.book.apply(call, grant)
