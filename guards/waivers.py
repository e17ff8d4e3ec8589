"""CAWS waivers: time-limited, approved exceptions that raise the token budget.

A waiver (``WV-0001``) covers one task type or ``*`` (all), adds ``extra_tokens``
to the effective budget while it is active, and records who approved it and why.
It is active from creation until ``expires_at`` (exclusive) unless revoked
earlier; nothing has to run for it to expire, because activity is always judged
against the caller's ``now``. Revoked and expired waivers stay in the book (the
control API lists them with their status); the audit log is the proxy's job.

Effective budget for the window = ``budget_limit`` + Σ ``extra_tokens`` of waivers
active at ``now`` (all task types, including ``*``). For a per-task limit, the
waivers for that task type and ``*`` are added.

Waivers live in a store map (one field per waiver) so that several instances can
create and revoke them without overwriting each other; ids come from the store's
atomic counter.

API::

    book = WaiverBook(store)
    w = await book.create(task_type="code", extra_tokens=50_000, reason="release week",
                           approver="alice", expires_at=now + 86_400, now=now)
    await book.list()                     # all, newest first; w.status(now) labels them
    await book.active(now)                # only active ones
    await book.revoke("WV-0001", now=now, by="bob")  # -> Waiver | None
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence

import msgspec

from guards.state import StateStore

WAIVERS_KEY = "caws:waivers"
WAIVER_SEQ_KEY = "caws:waivers:seq"


class Waiver(msgspec.Struct, frozen=True):
    id: str
    task_type: str  # a task type, or "*" for all
    extra_tokens: int
    reason: str
    approver: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    revoked_by: str | None = None

    def is_active(self, now: float) -> bool:
        """Active between creation and expiry (exclusive), unless revoked."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.created_at <= now < self.expires_at

    def covers(self, task_type: str) -> bool:
        return self.task_type == "*" or self.task_type == task_type

    def status(self, now: float) -> str:
        """``active``, ``revoked``, ``expired`` or ``pending`` (created_at in the future)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if now < self.created_at:
            return "pending"
        return "active"


def extra_tokens(waivers: Sequence[Waiver], now: float, task_type: str | None = None) -> int:
    """Σ extra tokens of waivers active at `now` (covering `task_type`, if given)."""
    return sum(w.extra_tokens for w in waivers if w.is_active(now) and (task_type is None or w.covers(task_type)))


def waiver_for(waivers: Sequence[Waiver], now: float, task_type: str) -> Waiver | None:
    """An active waiver covering `task_type` (the one expiring last), or None."""
    found = [w for w in waivers if w.is_active(now) and w.covers(task_type)]
    return max(found, key=lambda w: w.expires_at) if found else None


class WaiverBook:
    """Create, list and revoke waivers in a `StateStore`."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def create(
        self,
        *,
        task_type: str,
        extra_tokens: int,
        reason: str,
        approver: str,
        expires_at: float,
        now: float,
    ) -> Waiver:
        """Validate and store a new waiver; raises ValueError on bad input."""
        if not task_type.strip():
            raise ValueError("task_type must be a task type or '*'")
        if isinstance(extra_tokens, bool) or not isinstance(extra_tokens, int) or extra_tokens <= 0:
            raise ValueError("extra_tokens must be a positive integer")
        if not reason.strip():
            raise ValueError("reason is required")
        if not approver.strip():
            raise ValueError("approver is required")
        if not math.isfinite(expires_at) or expires_at <= now:
            raise ValueError("expires_at must be in the future")
        seq = await self._store.incr(WAIVER_SEQ_KEY)
        waiver = Waiver(
            id=f"WV-{seq:04d}",
            task_type=task_type.strip(),
            extra_tokens=extra_tokens,
            reason=reason.strip(),
            approver=approver.strip(),
            created_at=now,
            expires_at=expires_at,
        )
        await self._store.map_put(WAIVERS_KEY, waiver.id, msgspec.json.encode(waiver))
        return waiver

    async def list(self) -> builtins.list[Waiver]:
        """Every waiver in the book (any status), newest first; `Waiver.status(now)` labels them."""
        raw = await self._store.map_get_all(WAIVERS_KEY)
        waivers = [msgspec.json.decode(v, type=Waiver) for v in raw.values()]
        return sorted(waivers, key=lambda w: (w.created_at, w.id), reverse=True)

    async def active(self, now: float) -> builtins.list[Waiver]:
        return [w for w in await self.list() if w.is_active(now)]

    async def revoke(self, waiver_id: str, *, now: float, by: str) -> Waiver | None:
        """Mark a waiver revoked from `now` on; None if unknown. Revoking twice keeps the first."""
        raw = (await self._store.map_get_all(WAIVERS_KEY)).get(waiver_id)
        if raw is None:
            return None
        waiver = msgspec.json.decode(raw, type=Waiver)
        if waiver.revoked_at is not None:
            return waiver
        revoked = msgspec.structs.replace(waiver, revoked_at=now, revoked_by=by)
        await self._store.map_put(WAIVERS_KEY, waiver_id, msgspec.json.encode(revoked))
        return revoked
