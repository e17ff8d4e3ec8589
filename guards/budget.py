"""CAWS budget: reserve before forwarding, settle after, never overshoot.

It counts tokens, or dollars under ``caws.unit = "usd"``: the store and the leases
count whole units either way (tokens, or micro-dollars), so everything below holds
for both; only what a request reserves and settles is computed differently
(`BudgetGuard.amount`, `BudgetGuard.spent`): in dollars, the price of its prompt
estimate at the model's input price plus its cap at the output price, then its real
cost (`policies.pricing`). A model without a known price cannot be counted in
dollars: under ``reject`` such a request is refused as unavailable (503), under
``baseline`` it goes unbudgeted with the client's own parameters (reason
``unpriced``).

The budget (``caws.budget_limit`` tokens per UTC-aligned window of
``caws.window_s``, optionally also per task type via ``caws.per_task_limits``)
counts *all* traffic through Thermostat: optimised, shadow and baseline. Fill
levels are measured on ``used + reserved`` so requests in flight count at once.

Per request (one store round trip; the choice happens inside the atomic step)::

    verdict = await guard.decide(allowed=arms, chosen=i, baseline=base, task_type=ctx.task_type,
                                 prompt_tokens=ctx.prompt_tokens_est, confidence=p, now=now)
    if verdict.action == "reject": -> HTTP 429, code "budget_exceeded"
    else: send verdict.arm; later
        await guard.settle(verdict.reservation, prompt + completion tokens, now)   # on a response
        await guard.release(verdict.reservation, now)                             # on failure/cancel

Rules, in order (``E`` = effective limit = limit + Σ active waivers' extra tokens):

1. Reservation = ``prompt_tokens`` (the caller's conservative estimate; an
   underestimate shows up as real usage at settle time and is not capped) +
   the arm's ``max_tokens``, at most one token more than the largest limit: a
   client's max_tokens of 10**18 then still never fits (refused under ``reject``),
   and under ``baseline`` it holds a bounded amount that its settle gives back
   (unbounded, the Redis scripts could not do the arithmetic and the reservation
   stayed for the rest of the window).
2. Candidates, first that fits every key wins: the policy's chosen arm; else the
   cheapest allowed arm (fewest ``max_tokens``; ties: nearest temperature to the
   choice); else the baseline. ``chosen=None`` (non-optimised traffic) tries only
   the baseline.
3. Waiver zone: when ``used + reserved >= waiver_threshold * E`` on any key, an
   arm whose ``max_tokens`` exceeds the baseline's is allowed only if an active
   waiver covers the task type (or ``*``) **and** ``confidence >=
   confidence_threshold``. ``confidence`` is the propensity the policy gave its own
   choice (`Decision.policy_propensity`): for Thompson sampling the posterior
   probability that the arm is best, 1.0 for deterministic policies; None counts
   as below the threshold. It is used only inside the waiver zone, because
   exploration needs low-propensity choices and refusing them everywhere would
   starve the policy of data on larger arms. Fallback arms carry no confidence,
   so a costlier fallback is never taken inside the zone.
4. Exhausted (not even the baseline fits): ``on_exhausted="baseline"`` sends the
   baseline anyway (the budget limits what Thermostat adds, never the client's
   own traffic), reserving it and counting an overrun (``verdict.overrun``);
   ``"reject"`` returns ``action="reject"``.
5. ``verdict.warning`` is set when a key's fill after this reservation is
   ``>= warning_threshold`` (0.9): the caller raises the metric and the event.
6. If the store fails or times out (``store_timeout_s``), or CAWS is disabled,
   ``guard_ok``/``enforced`` say so and the arm is the baseline when
   ``require_caws`` (else the policy's choice, unbudgeted). Under
   ``on_exhausted="reject"`` a store failure rejects instead (``reason
   "guard_unavailable"``): a hard cap never sends a request it did not count.
7. With a `LeaseBook` (replicas on a shared store), the reservation comes from this
   replica's lease with no store call (`guards.lease`); a request that does not fit
   waits up to ``store_timeout_s`` for the background refill, then is exhausted (if
   the store said so) or unavailable (rule 6). Fill levels are then estimates: the
   store's counters with other replicas' leases counted as reserved.

Waivers: `create_waiver`, `list_waivers`, `revoke_waiver` (see `guards.waivers`);
`status(now)` returns a `BudgetStatus` for the control API and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

from guards.lease import LeaseBook
from guards.settings import CawsSettings, budget_units
from guards.state import MAX_TOKENS, BudgetKey, Candidate, Counters, InProcessStore, ReserveResult, StateStore
from guards.waivers import Waiver, WaiverBook, extra_tokens, waiver_for
from policies.pricing import Rates, reservation_usd, to_micro
from policies.records import Arm

_SLACK = 1e-9

Reason = Literal[
    "chosen",  # the policy's choice was reserved
    "cheaper_fit",  # the choice was refused; the cheapest allowed arm was reserved
    "baseline",  # non-optimised request (chosen=None): baseline reserved
    "baseline_fallback",  # the choice was refused; nothing cheaper fit; baseline reserved
    "exhausted_baseline",  # nothing fit; baseline sent anyway (overrun counted)
    "exhausted_reject",  # nothing fit; on_exhausted="reject"
    "guard_unavailable",  # the store failed or timed out
    "unpriced",  # unit "usd" and the model has no known price: it cannot be counted in dollars
    "disabled",  # caws.enabled = false
]

Refusal = Literal["does_not_fit", "waiver_required", "confidence_low"]


class Reservation(msgspec.Struct, frozen=True):
    """Tokens held for one request; hand it back to `settle` or `release` exactly once."""

    keys: tuple[str, ...]
    tokens: int
    window_start: int
    task_type: str
    leased: bool = False  # taken from this replica's lease: settled locally, no store call


class BudgetVerdict(msgspec.Struct, frozen=True):
    """What the budget allows for one request."""

    action: Literal["send", "reject"]
    arm: Arm  # what to send (on reject: the baseline, for the log)
    reason: Reason
    reservation: Reservation | None = None
    refused: Refusal | None = None  # why the policy's choice was not sent, if it was not
    guard_ok: bool = True  # False: the store failed; apply require_caws
    enforced: bool = True  # False: no budget accounting happened for this request
    fill: float = 0.0  # max over keys of (used + reserved) / effective limit, after reserving
    warning: bool = False
    exhausted: bool = False
    overrun: bool = False  # sent past the limit under on_exhausted="baseline"
    waiver_zone: bool = False
    waiver_id: str | None = None  # the waiver that let a costlier choice through
    effective_limit: int = 0  # of the global key

    @property
    def notes(self) -> tuple[str, ...]:
        """Short tags for `Decision.guard_notes`."""
        out = [f"budget:{self.reason}"]
        if self.refused:
            out.append(f"budget_refused:{self.refused}")
        if self.waiver_zone:
            out.append("budget:waiver_zone")
        if self.waiver_id:
            out.append(f"waiver:{self.waiver_id}")
        if self.warning:
            out.append("budget:warning")
        if self.overrun:
            out.append("budget:overrun")
        return tuple(out)


class BudgetLine(msgspec.Struct, frozen=True):
    limit: int
    effective_limit: int
    used: int
    reserved: int
    overruns: int
    fill: float


class BudgetStatus(msgspec.Struct, frozen=True):
    """Budget of the current window, for the control API and metrics."""

    window_start: int
    resets_at: int
    limit: int
    effective_limit: int
    used: int
    reserved: int
    overruns: int
    fill: float
    warning: bool
    exhausted: bool
    active_waivers: list[Waiver]
    tasks: dict[str, BudgetLine]


def _ceil_fraction(fraction: float, limit: int) -> int:
    """Smallest integer fill that counts as `>= fraction * limit` (no float surprises)."""
    return max(0, math.ceil(fraction * limit - _SLACK))


_NO_DEADLINE = contextlib.nullcontext()


class BudgetGuard:
    """The CAWS budget over a `StateStore`; see the module docstring for the rules."""

    def __init__(
        self, settings: CawsSettings, store: StateStore, *, require_caws: bool = True, leases: LeaseBook | None = None
    ) -> None:
        self.settings = settings  # a property: setting it rebuilds the tables derived from it
        self.store = store
        # The in-process store never suspends (its lock is never held across an await), so the
        # store timeout would only arm and cancel a timer twice per request (~2 % of the request's
        # CPU, bench/README.md). Exactly that class: a subclass may well wait, as tests' slow stores do.
        self._bounded = type(store) is not InProcessStore
        self.require_caws = require_caws
        self.leases = leases  # set: admit from local leases (guards/lease.py), never call the store here
        self.waivers = WaiverBook(store)
        self._waiver_cache: tuple[Waiver, ...] = ()
        self._waiver_cache_at: float | None = None
        self._seen_used: dict[str, int] = {}  # per key of the live windows: the `used` the store last answered

    @property
    def settings(self) -> CawsSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: CawsSettings) -> None:
        """Per request, everything that depends on the settings alone was recomputed: the limits in the
        store's unit, their gates and warning levels, the `_seen_used` bound. Settings are frozen, so the
        tables change only here (and the key names only with the window, `_names`)."""
        self._settings = settings
        self._tokens_unit = settings.unit == "tokens"
        self._limit_units = budget_units(settings, settings.budget_limit)
        self._task_units = {t: budget_units(settings, v) for t, v in settings.per_task_limits.items()}
        self._seen_bound = 4 * (1 + len(settings.per_task_limits))
        self._warn_at: dict[int, int] = {}  # limit -> smallest fill that warns (bounded: `_warning_level`)
        # Without active waivers (the common case) a key's limit and gate are these, for every request.
        plain = min(MAX_TOKENS, self._limit_units)
        self._plain_global = (plain, _ceil_fraction(settings.waiver_threshold, plain))
        self._plain_task = {
            t: (eff, _ceil_fraction(settings.waiver_threshold, eff))
            for t, eff in ((t, min(MAX_TOKENS, u)) for t, u in self._task_units.items())
        }
        self._names_window: int | None = None
        self._names_global = ""
        self._names_task: dict[str, str] = {}

    def _warning_level(self, limit: int) -> int:
        """`_ceil_fraction(warning_threshold, limit)`, remembered per limit (a handful: the configured
        limits, plus waivers'; cleared past 64 entries, so bounded)."""
        level = self._warn_at.get(limit)
        if level is None:
            if len(self._warn_at) >= 64:
                self._warn_at.clear()
            level = self._warn_at[limit] = _ceil_fraction(self._settings.warning_threshold, limit)
        return level

    def _names(self, window_start: int) -> None:
        """The key names of `window_start`'s window (`_global_key`, `_task_key` of each configured task
        type), rebuilt when the window moves: the f-strings once per window, not per request."""
        self._names_window = window_start
        self._names_global = self._global_key(window_start)
        self._names_task = {t: self._task_key(window_start, t) for t in self._task_units}

    # ---- windows and keys -------------------------------------------------------

    def window_start(self, now: float) -> int:
        """Start of the UTC-aligned window containing `now` (epoch multiples of window_s)."""
        window_s = self._settings.window_s
        return int(math.floor(now / window_s) * window_s)

    def _expires_at(self, window_start: int) -> float:
        # Two windows: late responses still settle into the window they reserved in.
        return float(window_start + 2 * self._settings.window_s)

    @staticmethod
    def _global_key(window_start: int) -> str:
        return f"caws:{window_start}:all"

    @staticmethod
    def _task_key(window_start: int, task_type: str) -> str:
        return f"caws:{window_start}:task:{task_type}"

    def _budget_keys(
        self, window_start: int, task_type: str, waivers: Sequence[Waiver], now: float, floors: Mapping[str, int] | None = None,
    ) -> list[BudgetKey]:
        """The keys to check (global, then the task type's if it has a limit), each with its effective limit and gate;
        `floors` given: each key's floor is the `used` last seen of it (`_seen_used`)."""
        if window_start != self._names_window:
            self._names(window_start)
        name = self._names_global
        task_name = self._names_task.get(task_type)
        if waivers:
            s = self._settings
            limit = min(MAX_TOKENS, self._limit_units + extra_tokens(waivers, now))
            gate = _ceil_fraction(s.waiver_threshold, limit)
        else:
            limit, gate = self._plain_global
        keys = [BudgetKey(name, limit, gate, floors.get(name, 0) if floors is not None else 0)]
        if task_name is not None:
            if waivers:
                eff = min(MAX_TOKENS, self._task_units[task_type] + extra_tokens(waivers, now, task_type))
                task_gate = _ceil_fraction(self._settings.waiver_threshold, eff)
            else:
                eff, task_gate = self._plain_task[task_type]
            keys.append(BudgetKey(task_name, eff, task_gate, floors.get(task_name, 0) if floors is not None else 0))
        return keys

    # ---- waivers ----------------------------------------------------------------

    def _waivers_stale(self, now: float) -> bool:
        at = self._waiver_cache_at
        return at is None or now < at or now - at >= self._settings.waiver_cache_s

    async def _cached_waivers(self, now: float) -> tuple[Waiver, ...]:
        """The waiver list, re-read when the copy is stale (`decide` checks staleness itself first,
        so a fresh copy costs no coroutine)."""
        if self._waivers_stale(now):
            self._waiver_cache = tuple(await self.waivers.list())
            self._waiver_cache_at = now
        return self._waiver_cache

    async def refresh_waivers(self, now: float) -> bool:
        """Re-read the waiver list if the copy is stale; with leases the background task calls
        this, so the request path never waits for the store. True if it was re-read."""
        if not self._waivers_stale(now):
            return False
        await self._cached_waivers(now)
        return True

    async def create_waiver(
        self, *, task_type: str, extra_tokens: int, reason: str, approver: str, expires_at: float, now: float
    ) -> Waiver:
        waiver = await self.waivers.create(
            task_type=task_type,
            extra_tokens=extra_tokens,
            reason=reason,
            approver=approver,
            expires_at=expires_at,
            now=now,
        )
        self._waiver_cache_at = None
        return waiver

    async def revoke_waiver(self, waiver_id: str, *, now: float, by: str) -> Waiver | None:
        waiver = await self.waivers.revoke(waiver_id, now=now, by=by)
        self._waiver_cache_at = None
        return waiver

    async def list_waivers(self) -> list[Waiver]:
        return await self.waivers.list()

    # ---- the decision -----------------------------------------------------------

    def _unguarded(self, chosen_arm: Arm | None, baseline: Arm, reason: Reason, guard_ok: bool) -> BudgetVerdict:
        arm = baseline if (self.require_caws or chosen_arm is None) else chosen_arm
        return BudgetVerdict(
            action="send",
            arm=arm,
            reason=reason,
            guard_ok=guard_ok,
            enforced=False,
            refused=None,
        )

    def _deadline(self) -> contextlib.AbstractAsyncContextManager[object]:
        """`store_timeout_s` around a store call, or nothing where the store cannot wait."""
        return asyncio.timeout(self.settings.store_timeout_s) if self._bounded else _NO_DEADLINE

    async def decide(
        self,
        *,
        allowed: Sequence[Arm],
        chosen: int | None,
        baseline: Arm,
        task_type: str,
        prompt_tokens: int,
        confidence: float | None,
        now: float,
        rates: Rates | None = None,
        model_rates: Mapping[str, Rates] | None = None,
    ) -> BudgetVerdict:
        """Reserve budget for this request and say which arm may be sent (see module docstring).

        `allowed` comes from `trust_region.allowed_arms`; `chosen` indexes it (None for
        requests that are not optimised). The returned arm is always `allowed[chosen]`,
        another member of `allowed`, or `baseline`. `rates`: the model's prices (unit "usd");
        `model_rates`: a stand-in's own (`Arm.model`), so under a dollar budget a cheaper
        stand-in is the cheaper arm offered when the chosen one needs a waiver or does not fit.
        """
        s = self._settings
        chosen_arm = allowed[chosen] if chosen is not None else None
        if not s.enabled:
            return self._unguarded(chosen_arm, baseline, "disabled", guard_ok=True)
        if s.unit == "usd" and rates is None:
            return self._unavailable(chosen_arm, baseline, "unpriced")
        prompt = self.amount(max(0, int(prompt_tokens)), 0, rates)
        window = self.window_start(now)
        if self.leases is not None:
            return await self._decide_leased(
                self.leases, chosen_arm, allowed, baseline, task_type, prompt, confidence, now, rates, model_rates,
            )
        confident = confidence is not None and confidence >= s.confidence_threshold
        if not self._bounded:
            # The in-process store: no deadline to arm (it never waits), and the reservation is its
            # synchronous step (`InProcessStore.reserve_now`, what its `budget_reserve` runs), so no
            # coroutine per store call either. A fresh waiver copy is read without one too.
            try:
                at = self._waiver_cache_at
                if at is None or now < at or now - at >= s.waiver_cache_s:
                    waivers = await self._cached_waivers(now)
                else:
                    waivers = self._waiver_cache
                keys = self._budget_keys(window, task_type, waivers, now, self._seen_used)
                waiver = waiver_for(waivers, now, task_type) if waivers else None
                arms, cands = self._candidates(
                    chosen_arm, allowed, baseline, prompt, waiver is not None and confident, keys, rates, model_rates,
                )
                result = self.store.reserve_now(keys, cands, now, self._expires_at(window))  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - any store failure is a fail-safe, never a crashed request
                return self._unavailable(chosen_arm, baseline)
        else:
            try:
                async with asyncio.timeout(s.store_timeout_s):
                    waivers = await self._cached_waivers(now)
                    keys = self._budget_keys(window, task_type, waivers, now, self._seen_used)
                    waiver = waiver_for(waivers, now, task_type) if waivers else None
                    arms, cands = self._candidates(
                        chosen_arm, allowed, baseline, prompt, waiver is not None and confident, keys, rates, model_rates,
                    )
                    result = await self.store.budget_reserve(keys, cands, now=now, expires_at=self._expires_at(window))
            except Exception:  # noqa: BLE001 - any store failure is a fail-safe, never a crashed request
                return self._unavailable(chosen_arm, baseline)
        self._saw(keys, result.after, window)
        return self._verdict(result, keys, arms, cands, chosen_arm, baseline, task_type, window, waiver, confident)

    def _saw(self, keys: Sequence[BudgetKey], counters: Sequence[Counters], window: int) -> None:
        """Remember each key's `used` as the store answered it: the floor of the next reserve
        (a store that lost its state is then not believed to have a fresh window)."""
        seen = self._seen_used
        for k, c in zip(keys, counters):
            last, used = seen.get(k.key, 0), c.used
            seen[k.key] = used if used > last else last  # max(last, used)
        if len(seen) > self._seen_bound:  # keys of windows long over
            live = (f"caws:{window}:", f"caws:{window - self._settings.window_s}:")
            self._seen_used = {k: v for k, v in self._seen_used.items() if k.startswith(live)}

    def _unavailable(self, chosen_arm: Arm | None, baseline: Arm, reason: Reason = "guard_unavailable") -> BudgetVerdict:
        """No budget answer in time (or no price to count in). Under ``reject`` that is a refusal: a
        hard cap never sends a request it could not count. Under ``baseline``, the client's own traffic goes."""
        if self.settings.on_exhausted == "reject":
            return BudgetVerdict(action="reject", arm=baseline, reason=reason, guard_ok=False, enforced=False)
        return self._unguarded(chosen_arm, baseline, reason, guard_ok=False)

    def amount(self, prompt_tokens: int, max_tokens: int, rates: Rates | None) -> int:
        """What a request with this prompt estimate and output cap reserves, in the budget's unit."""
        if self._tokens_unit or rates is None:
            return prompt_tokens + max_tokens
        return to_micro(reservation_usd(prompt_tokens, max_tokens, rates))

    def spent(self, prompt_tokens: int | None, completion_tokens: int | None, cost_usd: float | None) -> int | None:
        """What a finished request used, in the budget's unit; None when it cannot be told (no usage, or no price)."""
        if self._settings.unit == "usd":
            return None if cost_usd is None else to_micro(cost_usd)
        if prompt_tokens is None and completion_tokens is None:
            return None
        return (prompt_tokens or 0) + (completion_tokens or 0)

    async def _decide_leased(
        self,
        book: LeaseBook,
        chosen_arm: Arm | None,
        allowed: Sequence[Arm],
        baseline: Arm,
        task_type: str,
        prompt: int,
        confidence: float | None,
        now: float,
        rates: Rates | None = None,
        model_rates: Mapping[str, Rates] | None = None,
    ) -> BudgetVerdict:
        """`decide` from this replica's leases: no store round trip. A request that does not fit
        waits (at most ``store_timeout_s``) for the refill task's next answer."""
        s = self._settings
        window = self.window_start(now)
        waivers = self._waiver_cache  # refreshed by the background task
        keys = self._budget_keys(window, task_type, waivers, now)
        waiver = waiver_for(waivers, now, task_type)
        confident = confidence is not None and confidence >= s.confidence_threshold
        arms, cands = self._candidates(chosen_arm, allowed, baseline, prompt, waiver is not None and confident, keys, rates, model_rates)
        expires_at = self._expires_at(window)
        result = book.reserve(keys, cands, now=now, expires_at=expires_at)
        if result is None and not book.exhausted(keys, now):
            try:
                async with asyncio.timeout(s.store_timeout_s):  # a real wait for the refill, whatever the store
                    while result is None and not book.exhausted(keys, now):
                        await book.changed()
                        result = book.reserve(keys, cands, now=now, expires_at=expires_at, retry=True)
            except TimeoutError:
                pass
        if result is None:
            if not book.exhausted(keys, now):
                return self._unavailable(chosen_arm, baseline)
            result = book.reserve_exhausted(keys, cands, now=now, expires_at=expires_at)
            if result.index is None and book.recovering(keys):
                return self._unavailable(chosen_arm, baseline)  # the store is rebuilding lost state, not out of budget
        return self._verdict(result, keys, arms, cands, chosen_arm, baseline, task_type, window, waiver, confident, leased=True)

    def _candidates(
        self,
        chosen_arm: Arm | None,
        allowed: Sequence[Arm],
        baseline: Arm,
        prompt: int,
        costly_ok: bool,
        keys: Sequence[BudgetKey],
        rates: Rates | None = None,
        model_rates: Mapping[str, Rates] | None = None,
    ) -> tuple[list[Arm], list[Candidate]]:
        """`prompt`: the prompt estimate, already in the budget's unit; each arm adds its cap's (`amount`),
        at its own model's prices (`model_rates`, a stand-in without a price: the requested model's)."""
        force_baseline = self._settings.on_exhausted == "baseline"
        cap = (keys[0].limit if len(keys) == 1 else max(k.limit for k in keys)) + 1  # more than any key holds: never fits, yet bounded (rule 1)
        arms: list[Arm] = []
        cands: list[Candidate] = []
        if self._tokens_unit:
            # Tokens: an arm's output amount is its max_tokens (`amount(0, max_tokens, any rates)`), so the
            # closures of the general case below reduce to these comparisons, in the same order.
            if chosen_arm is not None:
                arms.append(chosen_arm)
                base_cost = baseline.max_tokens
                out = chosen_arm.max_tokens
                cands.append(Candidate(min(cap, prompt + out), gated=out > base_cost and not costly_ok))
                # min(allowed, key=(max_tokens, |Δ temperature|)): the first arm with the smallest key
                temperature = chosen_arm.temperature
                cheapest = allowed[0]
                best_out, best_gap = cheapest.max_tokens, abs(cheapest.temperature - temperature)
                for a in allowed:
                    out = a.max_tokens
                    if out < best_out or (out == best_out and abs(a.temperature - temperature) < best_gap):
                        cheapest, best_out, best_gap = a, out, abs(a.temperature - temperature)
                if cheapest != chosen_arm and cheapest != baseline:
                    arms.append(cheapest)
                    cands.append(Candidate(min(cap, prompt + best_out), gated=best_out > base_cost))
            arms.append(baseline)
            cands.append(Candidate(min(cap, prompt + baseline.max_tokens), force=force_baseline))
            return arms, cands

        def output(arm: Arm) -> int:
            own = model_rates.get(arm.model) if model_rates is not None and arm.model is not None else None
            return self.amount(0, arm.max_tokens, own or rates)

        def tokens(arm: Arm) -> int:
            return min(cap, prompt + output(arm))

        if chosen_arm is not None:
            arms.append(chosen_arm)
            base_cost = output(baseline)
            cands.append(Candidate(tokens(chosen_arm), gated=output(chosen_arm) > base_cost and not costly_ok))
            cheapest = min(
                allowed,
                key=lambda a: (output(a), abs(a.temperature - chosen_arm.temperature)),
            )
            if cheapest != chosen_arm and cheapest != baseline:
                arms.append(cheapest)
                cands.append(Candidate(tokens(cheapest), gated=output(cheapest) > base_cost))
        arms.append(baseline)
        cands.append(Candidate(tokens(baseline), force=force_baseline))
        return arms, cands

    def _verdict(
        self,
        result: ReserveResult,
        keys: Sequence[BudgetKey],
        arms: Sequence[Arm],
        cands: Sequence[Candidate],
        chosen_arm: Arm | None,
        baseline: Arm,
        task_type: str,
        window: int,
        waiver: Waiver | None,
        confident: bool,
        leased: bool = False,
    ) -> BudgetVerdict:
        # One pass per counter tuple instead of four generators: the same results (`fill` is the first
        # largest ratio, as `max` keeps it).
        zone = False
        for c, k in zip(result.before, keys):
            if c.used + c.reserved >= k.gate:
                zone = True
                break
        fill: float | None = None
        warning = full = False
        for c, k in zip(result.after, keys):
            total, limit = c.used + c.reserved, k.limit
            ratio = total / limit if limit > 0 else math.inf
            if fill is None or ratio > fill:
                fill = ratio
            if total >= self._warning_level(limit):
                warning = True
            if total >= limit:
                full = True
        if fill is None:
            fill = max(())  # no counters: raises as `max` over nothing always did
        refused: Refusal | None = None
        if chosen_arm is not None and result.index != 0:
            if cands[0].gated and zone:
                refused = "waiver_required" if waiver is None else "confidence_low"
            else:
                refused = "does_not_fit"
        if result.index is None:
            return BudgetVerdict(
                action="reject", arm=baseline, reason="exhausted_reject", exhausted=True,
                fill=fill, warning=warning, waiver_zone=zone, effective_limit=keys[0].limit, refused=refused,
            )
        arm = arms[result.index]
        reservation = Reservation(
            keys=tuple([k.key for k in keys]),
            tokens=cands[result.index].tokens,
            window_start=window,
            task_type=task_type,
            leased=leased,
        )
        if result.overrun:
            reason: Reason = "exhausted_baseline"
        elif chosen_arm is None:
            reason = "baseline"
        elif result.index == 0:
            reason = "chosen"
        elif result.index == len(arms) - 1:
            reason = "baseline_fallback"
        else:
            reason = "cheaper_fit"
        used_waiver = (
            waiver.id
            if waiver is not None and reason == "chosen" and chosen_arm is not None and chosen_arm.max_tokens > baseline.max_tokens and zone
            else None
        )
        return BudgetVerdict(
            action="send",
            arm=arm,
            reason=reason,
            reservation=reservation,
            exhausted=full or result.overrun,
            overrun=result.overrun,
            waiver_id=used_waiver,
            fill=fill,
            warning=warning,
            waiver_zone=zone,
            effective_limit=keys[0].limit,
            refused=refused,
        )

    # ---- after the response -----------------------------------------------------

    async def settle(self, reservation: Reservation | None, actual_tokens: int, now: float) -> bool:
        """Turn the reservation into real usage (in the budget's unit, `spent`); False if the store failed."""
        if reservation is None:
            return True
        actual = min(MAX_TOKENS, max(0, int(actual_tokens)))
        if reservation.leased and self.leases is not None:
            self.leases.settle(reservation.keys, reservation.tokens, actual)
            return True
        try:
            if not self._bounded:  # the in-process store's synchronous step, as in `decide`
                self.store.settle_now(  # type: ignore[attr-defined]
                    reservation.keys, reservation.tokens, actual, now, self._expires_at(reservation.window_start),
                )
            else:
                async with asyncio.timeout(self._settings.store_timeout_s):
                    await self.store.budget_settle(
                        reservation.keys,
                        reservation.tokens,
                        actual,
                        now=now,
                        expires_at=self._expires_at(reservation.window_start),
                    )
        except Exception:  # noqa: BLE001 - the outcome path must not crash; caller counts False
            return False
        seen = self._seen_used
        for key in reservation.keys:  # the store's `used` grew by at least this since we last saw it
            seen[key] = seen.get(key, 0) + actual
        return True

    async def charge(self, task_type: str, tokens: int, now: float) -> bool:
        """Count what was already spent outside a client request (the judge's calls, task type `_judge`), in the budget's unit.

        Nothing was reserved for them, so this is a settle of an empty reservation: the spend
        shows in the window and in the task's line, and later admissions see it.
        """
        if not self.settings.enabled or tokens <= 0:
            return True
        window = self.window_start(now)
        try:
            waivers = await self._cached_waivers(now)
        except Exception:  # noqa: BLE001 - the waivers only add headroom; count against the plain limits
            waivers = ()
        keys = tuple(k.key for k in self._budget_keys(window, task_type, waivers, now))
        return await self.settle(Reservation(keys=keys, tokens=0, window_start=window, task_type=task_type), tokens, now)

    async def release(self, reservation: Reservation | None, now: float) -> bool:
        """Give back a reservation of a request that failed or was cancelled."""
        if reservation is None:
            return True
        if reservation.leased and self.leases is not None:
            self.leases.release(reservation.keys, reservation.tokens)
            return True
        try:
            async with self._deadline():
                await self.store.budget_release(reservation.keys, reservation.tokens, now=now)
        except Exception:  # noqa: BLE001 - the outcome path must not crash; caller counts False
            return False
        return True

    # ---- reporting --------------------------------------------------------------

    async def status(self, now: float) -> BudgetStatus:
        """Counters of the current window (reads the store; raises if it is unreachable)."""
        s = self.settings
        window = self.window_start(now)
        waivers = await self.waivers.list()
        active = [w for w in waivers if w.is_active(now)]
        tasks = sorted(s.per_task_limits)
        names = [self._global_key(window)] + [self._task_key(window, t) for t in tasks]
        counters = await self.store.budget_read(names, now=now)
        effective = budget_units(s, s.budget_limit) + extra_tokens(active, now)
        total: Counters = counters[0]
        lines: dict[str, BudgetLine] = {}
        for task, c in zip(tasks, counters[1:]):
            eff = budget_units(s, s.per_task_limits[task]) + extra_tokens(active, now, task)
            lines[task] = BudgetLine(
                limit=budget_units(s, s.per_task_limits[task]),
                effective_limit=eff,
                used=c.used,
                reserved=c.reserved,
                overruns=c.overruns,
                fill=c.total / eff if eff > 0 else math.inf,
            )
        fill = total.total / effective if effective > 0 else math.inf
        return BudgetStatus(
            window_start=window,
            resets_at=window + s.window_s,
            limit=budget_units(s, s.budget_limit),
            effective_limit=effective,
            used=total.used,
            reserved=total.reserved,
            overruns=total.overruns,
            fill=fill,
            warning=total.total >= _ceil_fraction(s.warning_threshold, effective),
            exhausted=total.total >= effective,
            active_waivers=active,
            tasks=lines,
        )
