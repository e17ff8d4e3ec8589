"""Budget leases: admit requests from a local share of the budget, topped up in the background.

Why: with one store round trip per request, a store slower than ``store_timeout_s``
leaves two bad choices, sending the request unbudgeted (3 replicas on a Redis slowed
by 150 ms served 109,940 tokens against a 30,000 limit) or refusing it. Quota systems
(Google's Doorman, Envoy's rate-limit quota service) lease budget instead: each replica
holds a chunk sized to its recent spend, admits requests from it with no store round
trip, and a background task (`proxy.decision.lease_refill`) tops it up, reports usage and
returns what is not needed. A slow or absent store then only stops new leases; a
request that does not fit is refused, never sent unbudgeted.

Accounting per budget key (one `_Lease`), in tokens:

- ``amount``: what the store counts as reserved for this replica, as of its last
  reply. It is lowered *before* a call that gives tokens back, so a lost reply can
  only leave the store holding more for us than we think (safe), never less.
- ``held``: reservations of requests in flight here.
- ``pending``: actual usage settled here that the store has not acknowledged.
- ``free = amount - held - pending``: what a new request may take.

Settling moves the reservation out of ``held`` and the *actual* tokens into
``pending``, so the cap is on actual usage: a request that used less than it reserved
frees the rest at once; one that used more (a prompt the estimate undercounted) takes
the excess from ``free``, and the store adds it to ``used`` at the next report.

Store calls (`StateStore.budget_lease`, a `LeaseCall`) are absolute and idempotent:
they carry the cumulative usage settled here and the amount wanted afterwards, so a
reply lost to a timeout or a killed connection is simply repeated by the next call.
The cumulative figures are per (replica, key) for as long as the key lives: a lease
that goes idle is handed back but its record is kept (`_idle`) until the key's window
expires, so the next lease on that key continues the count the store compares with
(before, a new lease counted from 0 and the store ignored its usage until it passed
the old total). Every call carries a sequence number, strictly increasing per replica,
so a call given up on that reaches the store after a newer one changes nothing (the
amount it asked for is stale). A restarted replica is a new holder (a new id) with
fresh counts; the old holder's lease is reclaimed at its expiry. If the store lost its
state (a Redis flush), the calls say what this replica had seen and holds, and the
store rebuilds from them (`guards.state`, "Lost state").

Sizing (`plan`): the lease aims to keep ``free`` at the tokens asked for over the last
``lease_horizon_s`` (an exponentially decayed sum), at least the largest request it
recently admitted; near the limit at most ``lease_share`` of what the others have left
(or the one request that is waiting), so the last tokens are not stranded on one
replica; nothing after ``lease_horizon_s`` without requests (an idle or past-window
lease goes back). A grant smaller than the request that is waiting is not taken at all
(``min_amount``), for the same reason. A request that is refused stops waiting: its
size no longer holds back the top-ups the next, smaller requests need (before, one
oversized refusal left every later request on that replica refused).

A replica killed with -9 cannot report. Its lease stays counted as reserved until the
store reclaims it (2 x ``lease_ttl_s`` after its last call); the reservations it had in
flight at its last call are then counted as used. What stays uncounted is at most what
it admitted after its last call (calls go out every ``lease_refill_s``, and never more
than its lease), plus any usage above a request's reservation.

Expiry: a lease admits requests until ``lease_ttl_s`` after the last call the store
answered; the store reclaims an unrenewed lease after twice that, by which time this
replica has stopped admitting from it for ``lease_ttl_s``.

Nothing here does I/O or reads a clock: callers pass ``now``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from guards.settings import CawsSettings
from guards.state import BudgetKey, Candidate, Counters, LeaseCall, LeaseGrant, ReserveResult


class _Lease:
    __slots__ = (
        "acked_overruns", "acked_used", "amount", "asked", "busy", "expires_at", "gate", "held", "key", "last_seen", "limit",
        "need", "overruns_total", "recovering", "replied", "reply_amount", "short_of", "size", "size_at", "spend",
        "spend_at", "store", "synced", "used_total", "valid_until",
    )

    def __init__(self, key: BudgetKey, expires_at: float) -> None:
        self.key = key.key
        self.limit = key.limit
        self.gate = key.gate
        self.expires_at = expires_at
        self.amount = 0
        self.held = 0
        self.used_total = 0
        self.acked_used = 0
        self.acked_overruns = 0
        self.overruns_total = 0
        self.valid_until = -math.inf
        self.store = Counters()  # the key's counters in the last reply
        self.reply_amount = 0  # our amount in that reply
        self.replied = False  # the store has answered for this key (it holds our record)
        self.need = 0  # smallest candidate of the request waiting for a top-up (0: none)
        self.asked = 0  # the need the call under way asks the store to cover
        self.short_of = 0  # the need the last reply could not cover (0: it could, or was not asked)
        self.recovering = False  # the last reply said the store is rebuilding lost state
        self.size = 0.0  # the largest request admitted lately (decays like `spend`)
        self.size_at = -math.inf
        self.spend = 0.0  # decayed tokens asked for
        self.spend_at = -math.inf
        self.last_seen = -math.inf
        self.busy = False  # a store call for this key is under way
        self.synced = True  # False after a call that got no answer (the store may hold more)

    @property
    def pending(self) -> int:
        return self.used_total - self.acked_used

    def free(self, now: float) -> int:
        if now >= self.valid_until:
            return min(0, self.amount - self.held - self.pending)
        return self.amount - self.held - self.pending

    def estimate(self, overrun: int = 0) -> Counters:
        """The key's counters as this replica best knows them: the store's, with our lease
        replaced by what we actually hold and used (other replicas' leases count in full)."""
        return Counters(
            used=self.store.used + self.pending,
            reserved=max(0, self.store.reserved - self.reply_amount) + self.held,
            overruns=self.store.overruns + overrun,
        )


class LeaseBook:
    """This replica's leases, one per budget key; pure bookkeeping (see the module docstring)."""

    def __init__(self, settings: CawsSettings, holder: str) -> None:
        self.settings = settings
        self.holder = holder
        self._leases: dict[str, _Lease] = {}
        # Idle leases: nothing held or owed, but the cumulative counts the store compares
        # with must survive until the key's window expires.
        self._idle: dict[str, _Lease] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self.wakeup = asyncio.Event()  # set when a request found its lease short

    # ---- the request path (no I/O) ------------------------------------------------

    def _lease(self, key: BudgetKey, now: float, expires_at: float) -> _Lease:
        lease = self._leases.get(key.key)
        if lease is None:
            idle = self._idle.pop(key.key, None)
            lease = self._leases[key.key] = idle if idle is not None else _Lease(key, expires_at)
        lease.limit, lease.gate = key.limit, key.gate
        lease.expires_at = max(lease.expires_at, expires_at)
        lease.last_seen = now
        return lease

    def _decay(self, since: float, now: float) -> float:
        return math.exp(-max(0.0, now - since) / self.settings.lease_horizon_s) if since > -math.inf else 0.0

    def _count_spend(self, lease: _Lease, tokens: int, now: float) -> None:
        lease.spend = lease.spend * self._decay(lease.spend_at, now) + tokens
        lease.spend_at = max(lease.spend_at, now)

    def _count_admitted(self, lease: _Lease, tokens: int, now: float) -> None:
        """Only admitted requests set the size a lease keeps room for: a refused one will not come back."""
        lease.size = max(lease.size * self._decay(lease.size_at, now), float(tokens))
        lease.size_at = max(lease.size_at, now)

    def reserve(
        self, keys: Sequence[BudgetKey], candidates: Sequence[Candidate], *, now: float, expires_at: float, retry: bool = False
    ) -> ReserveResult | None:
        """Take the first candidate that fits every key's lease, like `StateStore.budget_reserve`.

        None: nothing fits the leases as they stand (the refill task is woken and told
        how much is needed). ``retry`` marks a second look at the same request, not
        counted as new spend.
        """
        return self._reserve(keys, candidates, now=now, expires_at=expires_at, force=False, retry=retry)

    def reserve_exhausted(
        self, keys: Sequence[BudgetKey], candidates: Sequence[Candidate], *, now: float, expires_at: float
    ) -> ReserveResult:
        """The budget is out: a forced candidate (on_exhausted="baseline") is taken anyway and
        counted as an overrun; index None means reject."""
        result = self._reserve(keys, candidates, now=now, expires_at=expires_at, force=True, retry=True)
        return result if result is not None else ReserveResult(index=None, before=(), after=())

    def _reserve(
        self,
        keys: Sequence[BudgetKey],
        candidates: Sequence[Candidate],
        *,
        now: float,
        expires_at: float,
        force: bool,
        retry: bool,
    ) -> ReserveResult | None:
        leases = [self._lease(k, now, expires_at) for k in keys]
        before = tuple(lease.estimate() for lease in leases)
        gated_refused = any(c.total >= k.gate for c, k in zip(before, keys))
        eligible = [c for c in candidates if not (c.gated and gated_refused)]
        if not retry and eligible:
            for lease in leases:
                self._count_spend(lease, eligible[0].tokens, now)
        for index, cand in enumerate(candidates):
            if cand.gated and gated_refused:
                continue
            over = [lease.free(now) < cand.tokens for lease in leases]
            if any(over) and not (force and cand.force):
                continue
            for lease, is_over in zip(leases, over):
                lease.held += cand.tokens
                if is_over:
                    lease.overruns_total += 1
                else:
                    lease.need = 0
                    self._count_admitted(lease, cand.tokens, now)
            after = tuple(lease.estimate() for lease in leases)
            return ReserveResult(index=index, before=before, after=after, overrun=any(over))
        if force:
            for lease in leases:  # refused: this request no longer waits for a top-up
                lease.need = 0
            return ReserveResult(index=None, before=before, after=before)
        smallest = min((c.tokens for c in eligible), default=0)
        for lease in leases:
            if lease.free(now) < smallest:
                lease.need = smallest
        self.wakeup.set()
        return None

    def exhausted(self, keys: Sequence[BudgetKey], now: float) -> bool:
        """A key's store answered recently and could not cover the request that is waiting."""
        for key in keys:
            lease = self._leases.get(key.key)
            if lease is not None and 0 < lease.short_of <= lease.need and now < lease.valid_until and lease.free(now) < lease.need:
                return True
        return False

    def recovering(self, keys: Sequence[BudgetKey]) -> bool:
        """A key's store is rebuilding lost state (it grants nothing new for a few seconds)."""
        return any((lease := self._leases.get(key.key)) is not None and lease.recovering for key in keys)

    async def changed(self) -> None:
        """Wait for the next store reply (any key)."""
        await self._changed.wait()

    def settle(self, keys: Sequence[str], reserved: int, actual: int) -> None:
        """A leased request finished: its reservation becomes `actual` tokens of usage."""
        for key in keys:
            lease = self._leases.get(key)
            if lease is None:  # a lease with held > 0 is never dropped
                continue
            lease.held = max(0, lease.held - reserved)
            lease.used_total += actual

    def release(self, keys: Sequence[str], reserved: int) -> None:
        """A leased request failed before the upstream answered: give the reservation back."""
        for key in keys:
            lease = self._leases.get(key)
            if lease is not None:
                lease.held = max(0, lease.held - reserved)

    # ---- the background task -----------------------------------------------------

    def target_free(self, lease: _Lease, now: float, closing: bool = False) -> int:
        """How many free tokens this lease should hold after the next call."""
        if closing or now - lease.last_seen >= self.settings.lease_horizon_s:
            return 0
        spend = math.ceil(lease.spend * self._decay(lease.spend_at, now))
        size = math.ceil(lease.size * self._decay(lease.size_at, now))
        want = max(spend, size, lease.need)
        others = lease.estimate()
        remaining = lease.limit - others.total
        cap = max(lease.need, math.ceil(self.settings.lease_share * max(0, remaining)))
        return min(want, cap)

    def plan(self, now: float, closing: bool = False) -> list[LeaseCall]:
        """The calls the refill task should make now (one per key that needs one).

        Moves leases that hold nothing and have nothing to report to `_idle` (dropped
        for good once their key's window has expired). Lowers ``amount`` for a lease
        that gives tokens back before the call goes out.
        """
        s = self.settings
        calls: list[LeaseCall] = []
        for name in [n for n, lease in self._idle.items() if lease.expires_at <= now]:
            del self._idle[name]
        for name, lease in list(self._leases.items()):
            if lease.busy:
                continue
            target = lease.held + self.target_free(lease, now, closing)
            # `synced`: no call failed since the last reply, so the store holds what we think
            reported = lease.synced and lease.pending == 0 and lease.acked_overruns == lease.overruns_total
            if lease.amount == 0 and lease.held == 0 and target == 0 and reported:
                del self._leases[name]
                if lease.expires_at > now:
                    self._idle[name] = lease
                continue
            post = lease.amount - lease.pending  # what the store will hold once the report is in
            if target < post:
                lease.amount = target + lease.pending
            lease.busy = True
            lease.asked = 0 if closing else lease.need
            self._seq += 1
            calls.append(
                LeaseCall(
                    key=name,
                    holder=self.holder,
                    limit=lease.limit,
                    used_total=lease.used_total,
                    overruns_total=lease.overruns_total,
                    target=target,
                    min_amount=0 if closing else lease.held + lease.need,
                    lease_expires_at=now + 2 * s.lease_ttl_s,
                    expires_at=lease.expires_at,
                    sent_at=now,
                    seq=self._seq,
                    held=lease.held,
                    known=lease.replied,
                    seen_used=lease.store.used,
                    acked_used=lease.acked_used,
                    claim=lease.amount,
                    valid_s=s.lease_ttl_s,
                )
            )
        return calls

    def apply(self, call: LeaseCall, grant: LeaseGrant) -> None:
        """The store answered `call`."""
        lease = self._leases.get(call.key)
        if lease is None:
            return
        lease.busy = False
        lease.synced = True
        lease.replied = True
        lease.recovering = grant.rebuilding
        lease.acked_used = max(lease.acked_used, call.used_total)
        lease.acked_overruns = max(lease.acked_overruns, call.overruns_total)
        lease.amount = grant.amount
        lease.reply_amount = grant.amount
        lease.store = grant.counters
        lease.valid_until = call.sent_at + self.settings.lease_ttl_s
        # Only a call that asked for the waiting request's tokens can say they are not there: the
        # reply to a give-back planned just before the request came says nothing about it.
        lease.short_of = lease.asked if lease.asked > 0 and lease.free(call.sent_at) < lease.asked else 0
        if lease.need > 0 and lease.free(call.sent_at) >= lease.need:
            lease.need = 0
        self._changed.set()
        self._changed = asyncio.Event()

    def failed(self, call: LeaseCall) -> None:
        """The call got no answer; the lease keeps admitting until it expires."""
        lease = self._leases.get(call.key)
        if lease is not None:
            lease.busy = False
            lease.synced = False

    # ---- reporting ---------------------------------------------------------------

    def held_tokens(self) -> int:
        """Free tokens this replica holds over all its leases (for metrics and tests)."""
        return sum(max(0, lease.amount - lease.held - lease.pending) for lease in self._leases.values())

    def keys(self) -> list[str]:
        """Budget keys this replica holds a lease on (or owes a report for)."""
        return list(self._leases)
