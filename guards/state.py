"""State behind the guards: a small store protocol and its in-process implementation.

Why a protocol: several proxy instances must share one token budget, one waiver
list and one rollout state, so the guards never hold shared state themselves. They
call a `StateStore`, which offers exactly the operations that need atomicity or
sharing and nothing else. `InProcessStore` (here) serves one process; the
shared-state issue adds a Redis implementation with the same semantics (one Lua
script per budget call, so one round trip per request).

Budget counters
    A budget key (e.g. ``caws:1767225600:all``) holds three integers: ``used``
    (settled tokens), ``reserved`` (tokens held by requests in flight) and
    ``overruns`` (requests let through although they did not fit). Keys embed the
    UTC-aligned window start, so a new window starts from zero without a reset job;
    every budget write carries ``expires_at`` (unix seconds) after which the key may
    be dropped (Redis: ``PEXPIRE`` of ``expires_at - now``; here: lazy pruning).

    `budget_reserve` is the heart: given the keys (each with its limit and its
    waiver "gate") and candidate reservations in order of preference, it atomically
    reserves the first candidate that fits every key and reports the counters
    before and after. Doing the choice inside the atomic step is what keeps 1,000
    concurrent requests from overshooting: no caller ever acts on a stale read.

    A key's ``used`` is first raised to the caller's ``floor`` (the ``used`` it last
    saw): within a window ``used`` only grows, so a lower figure means the store lost
    its state (a Redis flush), and counting from zero would grant the window again.

    A candidate fits a key when ``used + reserved + tokens <= limit``. A *gated*
    candidate (one that would raise expected spend without a waiver) is refused on a
    key whose ``used + reserved >= gate``. A *forced* candidate is accepted even if
    it does not fit (the client's own parameters under ``on_exhausted="baseline"``);
    each key it overshoots gets ``overruns += 1``.

Leases
    `budget_lease` lets a replica hold part of a key's budget (`guards.lease`). A
    lease is counted in the key's ``reserved``; per holder the store keeps its
    ``amount``, its cumulative reported usage and overruns, its expiry, the last call
    sequence it applied and the reservations in flight at that call. One atomic call:
    (1) other holders' leases past their expiry go back (``reserved -= amount``), except
    the reservations they had in flight at their last call, which count as ``used``
    (a replica killed with -9 leaves requests that may have been served; if the holder
    comes back, the charge is taken back and its own report counts instead); (2) the
    usage reported since the last call (``used_total`` minus what was recorded) moves
    into ``used`` and out of the holder's amount; overruns likewise; (3) the amount
    moves towards ``target``: down at once, up by at most what is left under the limit,
    and not at all if that would stay below ``min_amount``. Reports are cumulative, so
    a repeated call changes nothing twice; a call whose ``seq`` is not above the last
    applied one (a call given up on that reached the store late) changes nothing at all.

    Lost state: a call from a holder that has had a reply for this key (``known``) but
    whose record is gone means the store lost it (Redis flushed or restarted without
    persistence). The store then rebuilds, conservatively: the holder's acknowledged
    usage and its current amount are taken back; usage the store had counted for
    holders that have not reported since (``seen_used`` minus the reported holders'
    acknowledged usage, the largest such figure any caller saw) stays counted; and no
    holder is granted anything new for ``valid_s`` (a lease admits for that long after
    its last answered call), by which time every replica that has not reported has
    stopped admitting from its lease.

Blobs, maps, counters
    `get`/`set` hold small JSON documents (rollout state); `map_*` hold records
    that are added and removed one at a time by several writers (waivers; Redis
    hash); `incr` hands out ids (``WV-NNNN``). These never expire.

Nothing here reads a clock: the time-dependent calls take ``now``.

Persistence of the in-process store
    Without Redis this store is the only copy of the budget, waivers and rollout
    state, so a restart must not forget them. The store itself does no I/O: after
    every change it hands a `StateChange` (the new value of what changed, never a
    delta, so replaying one twice is harmless) to an injected `on_change`, and
    `dump()`/`restore()` give and take the whole state. `proxy/store/local_state.py`
    journals the changes and snapshots the dump under `data_dir`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

import msgspec

# The largest token count the budget handles. Redis's Lua numbers are doubles and are
# written back exactly only below about 1e16, so the guard clamps every reservation and
# limit here (a client's max_tokens of 10**18 made the settle script fail, leaving the
# reservation in place for the rest of the window).
MAX_TOKENS = 10**15


class BudgetKey(msgspec.Struct, frozen=True):
    """One budget counter to check: `limit` is the effective limit (waivers included)."""

    key: str
    limit: int
    gate: int  # used + reserved at or above which gated candidates are refused
    # The key's `used` the caller last saw. `used` never falls within a window, so a store whose
    # `used` is below it has lost its state (Redis flushed) and `budget_reserve` raises it to this.
    floor: int = 0


class Candidate(msgspec.Struct, frozen=True):
    """One possible reservation, tried in order."""

    tokens: int
    gated: bool = False  # refused once any key's fill reaches its gate
    force: bool = False  # accepted even if it does not fit (counted as an overrun)


class Counters(msgspec.Struct, frozen=True):
    used: int = 0
    reserved: int = 0
    overruns: int = 0

    @property
    def total(self) -> int:
        """What fill levels are measured on: settled plus in flight."""
        return self.used + self.reserved


class ReserveResult(msgspec.Struct, frozen=True):
    """Outcome of `budget_reserve`: `index` of the accepted candidate, or None."""

    index: int | None
    before: tuple[Counters, ...]  # one per key, in the order given
    after: tuple[Counters, ...]
    overrun: bool = False  # the accepted candidate was forced past a limit


class LeaseCall(msgspec.Struct, frozen=True):
    """One lease report/top-up for one budget key (see `StateStore.budget_lease`)."""

    key: str
    holder: str
    limit: int
    used_total: int  # cumulative actual tokens settled by this holder on this key
    overruns_total: int  # cumulative forced requests (on_exhausted="baseline")
    target: int  # the amount to hold after the call
    min_amount: int  # grant nothing unless the amount reaches this
    lease_expires_at: float  # the store may reclaim the amount after this
    expires_at: float  # the budget key's own expiry (its window)
    sent_at: float  # `now` when the call was planned
    seq: int = 0  # > 0: strictly increasing per holder; a call at or below the last applied one is stale
    held: int = 0  # reservations in flight now: counted as used if the lease is reclaimed
    known: bool = False  # the holder has had a reply for this key (its record must be in the store)
    seen_used: int = 0  # the key's `used` in that last reply
    acked_used: int = 0  # this holder's usage the store had counted in that reply
    claim: int = 0  # the amount this holder admits from (taken back if the store lost it)
    valid_s: float = 0.0  # how long the holder admits after an answered call (lease_ttl_s)


class LeaseGrant(msgspec.Struct, frozen=True):
    """The store's answer: this holder's amount now, and the key's counters (leases count as reserved)."""

    amount: int
    counters: Counters
    rebuilding: bool = False  # the store lost its state and grants nothing new for now


class StoreUnavailable(Exception):
    """The store could not be reached; guards turn this into a fail-safe verdict."""


@runtime_checkable
class StateStore(Protocol):
    """What the guards need from shared state. All methods are atomic per call."""

    async def budget_reserve(
        self,
        keys: Sequence[BudgetKey],
        candidates: Sequence[Candidate],
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        """Reserve the first candidate that passes on every key (see module docstring)."""
        ...

    async def budget_settle(self, keys: Sequence[str], reserved: int, actual: int, *, now: float, expires_at: float) -> None:
        """Move a reservation to used: ``reserved -= reserved``, ``used += actual``."""
        ...

    async def budget_release(self, keys: Sequence[str], reserved: int, *, now: float) -> None:
        """Drop a reservation of a request that failed or was cancelled."""
        ...

    async def budget_read(self, keys: Sequence[str], *, now: float) -> tuple[Counters, ...]:
        """Current counters (zeros for unknown or expired keys)."""
        ...

    async def budget_lease(self, call: LeaseCall, *, now: float) -> LeaseGrant:
        """Report a holder's usage on a key and move its lease towards `call.target` (see below)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def incr(self, key: str, amount: int = 1) -> int:
        """Add `amount` and return the new value (starting from 0)."""
        ...

    async def map_put(self, key: str, field: str, value: bytes) -> None: ...

    async def map_get_all(self, key: str) -> dict[str, bytes]: ...

    async def map_delete(self, key: str, field: str) -> bool: ...


class StateChange(msgspec.Struct, frozen=True, array_like=True):
    """The new value of one thing in an `InProcessStore` (budget counters, blob, counter, map field)."""

    kind: Literal["budget", "blob", "counter", "map_put", "map_del"]
    key: str
    field: str = ""
    value: bytes = b""
    counters: tuple[int, int, int] = (0, 0, 0)  # budget: used, reserved, overruns; counter: (value, 0, 0)
    expires_at: float = 0.0


class StateDump(msgspec.Struct, frozen=True):
    """Everything an `InProcessStore` holds (budgets as ``(used, reserved, overruns, expires_at)``)."""

    budgets: dict[str, tuple[int, int, int, float]] = {}
    blobs: dict[str, bytes] = {}
    counters: dict[str, int] = {}
    maps: dict[str, dict[str, bytes]] = {}
class _Holder:
    __slots__ = ("amount", "charged", "expires_at", "held", "overruns_total", "seq", "used_total")

    def __init__(self) -> None:
        self.amount = 0
        self.used_total = 0
        self.overruns_total = 0
        self.expires_at = 0.0
        self.seq = 0
        self.held = 0  # reservations in flight at the holder's last call
        self.charged = 0  # of those, counted as used when its lease was reclaimed


class _Budget:
    __slots__ = ("expires_at", "ghost_max", "ghost_sum", "leases", "overruns", "rebuild_until", "reserved", "used")

    def __init__(self) -> None:
        self.used = 0
        self.reserved = 0
        self.overruns = 0
        self.expires_at = 0.0
        self.leases: dict[str, _Holder] = {}
        self.rebuild_until: float | None = None  # set once a known holder found its record gone
        self.ghost_max = 0  # largest `used` a re-adopted holder had seen
        self.ghost_sum = 0  # usage the re-adopted holders had acknowledged

    def snapshot(self) -> Counters:
        return Counters(self.used, self.reserved, self.overruns)

    def reclaim(self, holder: str, now: float) -> None:
        """Other holders' expired leases go back; what they had in flight counts as used."""
        for name, other in self.leases.items():
            if name != holder and other.amount > 0 and other.expires_at <= now:
                charge = min(other.amount, other.held)
                self.reserved = max(0, self.reserved - other.amount)
                self.used += charge
                other.charged += charge
                other.amount = 0

    def adopt(self, mine: _Holder, call: LeaseCall, now: float) -> None:
        """A known holder's record is gone (the store lost its state): rebuild from its report."""
        if self.rebuild_until is None:
            self.rebuild_until = now + call.valid_s
        before = max(0, self.ghost_max - self.ghost_sum)
        self.ghost_max = max(self.ghost_max, call.seen_used)
        self.ghost_sum += call.acked_used
        self.used += call.acked_used + max(0, self.ghost_max - self.ghost_sum) - before
        mine.used_total = call.acked_used
        if now < self.rebuild_until:
            mine.amount = min(call.claim, call.limit)
            self.reserved += mine.amount

    def rebuilding(self, now: float) -> bool:
        return self.rebuild_until is not None and now < self.rebuild_until


class InProcessStore:
    """`StateStore` for a single process: dicts behind one `asyncio.Lock`.

    The lock makes every call atomic with respect to other coroutines (the
    operations never await while holding it, so it is never held across I/O).
    Expired budget keys are dropped lazily, at most once per `prune_every_s`
    of injected time, so memory stays bounded by the number of live windows.
    """

    def __init__(self, prune_every_s: float = 60.0, on_change: Callable[[StateChange], None] | None = None) -> None:
        self.on_change = on_change
        self.version = 0  # bumped on every change (a snapshot is due when it moved)
        self._lock = asyncio.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._blobs: dict[str, bytes] = {}
        self._counters: dict[str, int] = {}
        self._maps: dict[str, dict[str, bytes]] = {}
        self._prune_every_s = prune_every_s
        self._next_prune = float("-inf")

    def _changed_budgets(self, keys: Sequence[str]) -> None:
        self.version += 1
        if self.on_change is None:
            return
        for key in keys:
            b = self._budgets.get(key)
            if b is not None:
                self.on_change(StateChange("budget", key, counters=(b.used, b.reserved, b.overruns), expires_at=b.expires_at))

    def _changed(self, change: StateChange) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change(change)

    def apply(self, change: StateChange) -> None:
        """Replay one journaled change (sets the value; idempotent)."""
        if change.kind == "budget":
            b = self._budgets.setdefault(change.key, _Budget())
            b.used, b.reserved, b.overruns = change.counters
            b.expires_at = change.expires_at
        elif change.kind == "blob":
            self._blobs[change.key] = change.value
        elif change.kind == "counter":
            self._counters[change.key] = change.counters[0]
        elif change.kind == "map_put":
            self._maps.setdefault(change.key, {})[change.field] = change.value
        else:
            self._maps.get(change.key, {}).pop(change.field, None)

    def dump(self) -> StateDump:
        return StateDump(
            budgets={k: (b.used, b.reserved, b.overruns, b.expires_at) for k, b in self._budgets.items()},
            blobs=dict(self._blobs),
            counters=dict(self._counters),
            maps={k: dict(v) for k, v in self._maps.items()},
        )

    def restore(self, dump: StateDump) -> None:
        self._budgets = {}
        for key, (used, reserved, overruns, expires_at) in dump.budgets.items():
            b = self._budgets[key] = _Budget()
            b.used, b.reserved, b.overruns, b.expires_at = used, reserved, overruns, expires_at
        self._blobs = dict(dump.blobs)
        self._counters = dict(dump.counters)
        self._maps = {k: dict(v) for k, v in dump.maps.items()}

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + self._prune_every_s
        for key in [k for k, b in self._budgets.items() if b.expires_at <= now]:
            del self._budgets[key]

    def _live(self, key: str, now: float) -> _Budget | None:
        budget = self._budgets.get(key)
        if budget is None or budget.expires_at <= now:
            return None
        return budget

    def _budget(self, key: str, now: float, expires_at: float) -> _Budget:
        budget = self._live(key, now)
        if budget is None:
            budget = _Budget()
            self._budgets[key] = budget
        budget.expires_at = max(budget.expires_at, expires_at)
        return budget

    async def budget_reserve(
        self,
        keys: Sequence[BudgetKey],
        candidates: Sequence[Candidate],
        *,
        now: float,
        expires_at: float,
    ) -> ReserveResult:
        async with self._lock:
            return self.reserve_now(keys, candidates, now, expires_at)

    def reserve_now(self, keys: Sequence[BudgetKey], candidates: Sequence[Candidate], now: float, expires_at: float) -> ReserveResult:
        """`budget_reserve` as the synchronous step it is (`guards.budget` calls it directly on this class).

        Atomic without the lock: no method here holds the lock across an await, so the lock is never
        held while another coroutine runs, and a step that does not await cannot be interleaved.
        """
        if now >= self._next_prune:
            self._prune(now)
        budgets = [self._budget(k.key, now, expires_at) for k in keys]
        for budget, k in zip(budgets, keys):
            if k.floor > budget.used:
                budget.used = k.floor
        before = tuple([Counters(b.used, b.reserved, b.overruns) for b in budgets])
        gated_refused = False
        for budget, k in zip(budgets, keys):
            if budget.used + budget.reserved >= k.gate:
                gated_refused = True
                break
        for index, cand in enumerate(candidates):
            if cand.gated and gated_refused:
                continue
            tokens = cand.tokens
            over = [b.used + b.reserved + tokens > k.limit for b, k in zip(budgets, keys)]
            overrun = True in over
            if overrun and not cand.force:
                continue
            for budget, is_over in zip(budgets, over):
                budget.reserved += tokens
                if is_over:
                    budget.overruns += 1
            self._changed_budget_list(budgets, keys)
            after = tuple([Counters(b.used, b.reserved, b.overruns) for b in budgets])
            return ReserveResult(index=index, before=before, after=after, overrun=overrun)
        return ReserveResult(index=None, before=before, after=before)

    def _changed_budget_list(self, budgets: Sequence[_Budget], keys: Sequence[BudgetKey]) -> None:
        """`_changed_budgets` for budgets at hand (the same changes, no second look-up of each key)."""
        self.version += 1
        on_change = self.on_change
        if on_change is None:
            return
        for b, k in zip(budgets, keys):
            on_change(StateChange("budget", k.key, counters=(b.used, b.reserved, b.overruns), expires_at=b.expires_at))

    async def budget_settle(self, keys: Sequence[str], reserved: int, actual: int, *, now: float, expires_at: float) -> None:
        async with self._lock:
            self.settle_now(keys, reserved, actual, now, expires_at)

    def settle_now(self, keys: Sequence[str], reserved: int, actual: int, now: float, expires_at: float) -> None:
        """`budget_settle` as its synchronous step (atomic without the lock, as `reserve_now` says)."""
        for key in keys:
            budget = self._budget(key, now, expires_at)
            budget.reserved = max(0, budget.reserved - reserved)
            budget.used += actual
        self._changed_budgets(keys)

    async def budget_release(self, keys: Sequence[str], reserved: int, *, now: float) -> None:
        async with self._lock:
            for key in keys:
                budget = self._live(key, now)
                if budget is not None:
                    budget.reserved = max(0, budget.reserved - reserved)
            self._changed_budgets(keys)

    async def budget_read(self, keys: Sequence[str], *, now: float) -> tuple[Counters, ...]:
        async with self._lock:
            out = []
            for key in keys:
                budget = self._live(key, now)
                out.append(budget.snapshot() if budget is not None else Counters())
            return tuple(out)

    async def budget_lease(self, call: LeaseCall, *, now: float) -> LeaseGrant:
        async with self._lock:
            self._prune(now)
            budget = self._budget(call.key, now, call.expires_at)
            budget.reclaim(call.holder, now)
            mine = budget.leases.get(call.holder)
            if mine is None:
                mine = budget.leases[call.holder] = _Holder()
                if call.known:
                    budget.adopt(mine, call, now)
            elif 0 < call.seq <= mine.seq:  # a call given up on that arrived late: changes nothing
                return LeaseGrant(amount=mine.amount, counters=budget.snapshot(), rebuilding=budget.rebuilding(now))
            if mine.charged:  # the holder is back: its own reports count instead of the charge
                budget.used = max(0, budget.used - mine.charged)
                mine.charged = 0
            used = max(0, call.used_total - mine.used_total)
            budget.used += used
            taken = min(mine.amount, used)
            mine.amount -= taken
            budget.reserved = max(0, budget.reserved - taken)
            budget.overruns += max(0, call.overruns_total - mine.overruns_total)
            mine.used_total = max(mine.used_total, call.used_total)
            mine.overruns_total = max(mine.overruns_total, call.overruns_total)
            if call.target > mine.amount:
                if not budget.rebuilding(now):
                    grant = min(call.target - mine.amount, max(0, call.limit - budget.used - budget.reserved))
                    if mine.amount + grant >= call.min_amount:
                        mine.amount += grant
                        budget.reserved += grant
            elif call.target < mine.amount:
                budget.reserved = max(0, budget.reserved - (mine.amount - call.target))
                mine.amount = call.target
            mine.expires_at = call.lease_expires_at
            mine.seq = max(mine.seq, call.seq)
            mine.held = call.held
            return LeaseGrant(amount=mine.amount, counters=budget.snapshot(), rebuilding=budget.rebuilding(now))

    async def get(self, key: str) -> bytes | None:
        return self._blobs.get(key)

    async def set(self, key: str, value: bytes) -> None:
        self._blobs[key] = value
        self._changed(StateChange("blob", key, value=value))

    async def incr(self, key: str, amount: int = 1) -> int:
        async with self._lock:
            value = self._counters.get(key, 0) + amount
            self._counters[key] = value
            self._changed(StateChange("counter", key, counters=(value, 0, 0)))
            return value

    async def map_put(self, key: str, field: str, value: bytes) -> None:
        self._maps.setdefault(key, {})[field] = value
        self._changed(StateChange("map_put", key, field, value))

    async def map_get_all(self, key: str) -> dict[str, bytes]:
        return dict(self._maps.get(key, {}))

    async def map_delete(self, key: str, field: str) -> bool:
        found = self._maps.get(key, {}).pop(field, None) is not None
        if found:
            self._changed(StateChange("map_del", key, field))
        return found
