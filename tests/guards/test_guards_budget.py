"""CAWS budget and waivers with an injected clock; every number below is worked out by hand."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import pytest

from guards.budget import BudgetGuard, BudgetVerdict
from guards.settings import CawsSettings
from guards.state import BudgetKey, Candidate, Counters, InProcessStore, ReserveResult, StateStore
from policies.records import Arm

DAY = 86_400
T0 = 20_000 * DAY + 3_600.0  # 01:00 UTC on some day
BASE = Arm(0.7, 100)
SMALL = Arm(0.7, 50)
BIG = Arm(0.9, 200)
ARMS = [SMALL, BASE, BIG]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make(limit: int = 1000, **kw: Any) -> tuple[BudgetGuard, InProcessStore]:
    store = InProcessStore()
    kw.setdefault("waiver_cache_s", 0.0)
    return BudgetGuard(CawsSettings(budget_limit=limit, **kw), store), store


async def fill(guard: BudgetGuard, tokens: int, now: float = T0, task: str = "chat") -> None:
    """Put `tokens` of settled usage into the window (a baseline request settled in full)."""
    v = await guard.decide(
        allowed=[Arm(0.7, tokens)], chosen=None, baseline=Arm(0.7, tokens), task_type=task, prompt_tokens=0, confidence=None, now=now
    )
    assert v.reservation is not None
    await guard.settle(v.reservation, tokens, now)


async def pick(
    guard: BudgetGuard,
    chosen: Arm | None,
    *,
    conf: float | None = 1.0,
    prompt: int = 0,
    task: str = "chat",
    now: float = T0,
    allowed: Sequence[Arm] = ARMS,
    base: Arm = BASE,
) -> BudgetVerdict:
    idx = None if chosen is None else list(allowed).index(chosen)
    return await guard.decide(allowed=allowed, chosen=idx, baseline=base, task_type=task, prompt_tokens=prompt, confidence=conf, now=now)


async def counters(guard: BudgetGuard, now: float = T0) -> Counters:
    return (await guard.store.budget_read([f"caws:{guard.window_start(now)}:all"], now=now))[0]


# ---- reserve / settle / release ---------------------------------------------------


def test_reserve_is_prompt_plus_max_tokens_and_settles_to_actual() -> None:
    async def go() -> None:
        guard, _ = make()
        v = await pick(guard, BIG, prompt=30)
        assert (v.action, v.arm, v.reason) == ("send", BIG, "chosen")
        assert v.reservation is not None and v.reservation.tokens == 230
        assert await counters(guard) == Counters(used=0, reserved=230)
        assert v.fill == pytest.approx(0.23)
        assert await guard.settle(v.reservation, 120, T0 + 5)
        assert await counters(guard) == Counters(used=120, reserved=0)

    run(go())


def test_failed_request_releases_its_reservation() -> None:
    async def go() -> None:
        guard, _ = make()
        v = await pick(guard, BIG)
        assert await counters(guard) == Counters(used=0, reserved=200)
        assert await guard.release(v.reservation, T0 + 1)
        assert await counters(guard) == Counters()
        assert await guard.release(None, T0 + 1)  # nothing reserved, nothing to do

    run(go())


def test_reservations_count_before_settlement_so_in_flight_requests_cannot_overshoot() -> None:
    async def go() -> None:
        guard, _ = make(limit=520, on_exhausted="reject")  # waiver gate at 416
        first = await pick(guard, BIG)  # 200 reserved
        second = await pick(guard, BIG)  # 400 reserved
        third = await pick(guard, BIG)  # 600 would not fit -> cheapest (50) fits
        assert (first.reason, second.reason, third.reason) == ("chosen", "chosen", "cheaper_fit")
        assert third.arm == SMALL and third.refused == "does_not_fit"
        assert await counters(guard) == Counters(used=0, reserved=450)

    run(go())


def test_baseline_fallback_when_no_allowed_arm_fits() -> None:
    async def go() -> None:
        guard, _ = make(limit=260)
        allowed = [Arm(0.7, 300), Arm(0.7, 250)]  # baseline (200) not among them
        await fill(guard, 50)
        v = await pick(guard, Arm(0.7, 300), allowed=allowed, base=Arm(0.7, 200))
        assert (v.reason, v.arm, v.overrun) == ("baseline_fallback", Arm(0.7, 200), False)

    run(go())


def test_window_is_utc_aligned_and_late_settlement_stays_in_its_window() -> None:
    async def go() -> None:
        guard, _ = make()
        assert guard.window_start(T0) == 20_000 * DAY
        v = await pick(guard, BIG, now=20_001 * DAY - 1)
        assert v.reservation is not None and v.reservation.window_start == 20_000 * DAY
        await guard.settle(v.reservation, 150, 20_001 * DAY + 10)  # response arrives after midnight
        old = await counters(guard, 20_001 * DAY + 10 - DAY)
        assert old == Counters(used=150, reserved=0)
        status = await guard.status(20_001 * DAY + 10)
        assert (status.window_start, status.resets_at, status.used) == (20_001 * DAY, 20_002 * DAY, 0)

    run(go())


# ---- fill levels: exactly at 80 %, 90 %, 100 % --------------------------------------


def test_waiver_zone_starts_exactly_at_80_percent() -> None:
    async def go() -> None:
        guard, _ = make()
        await fill(guard, 799)
        below = await pick(guard, BIG)
        assert (below.reason, below.waiver_zone) == ("chosen", False)
        await guard.release(below.reservation, T0)
        await fill(guard, 1)  # 800 of 1000
        at = await pick(guard, BIG)
        assert at.waiver_zone and at.refused == "waiver_required"
        assert (at.arm, at.reason) == (SMALL, "cheaper_fit")
        # arms that cost no more than the baseline are still fine
        same = await pick(guard, BASE)
        assert (same.arm, same.reason) == (BASE, "chosen")

    run(go())


def test_waiver_and_confidence_unlock_costlier_arms_in_the_zone() -> None:
    async def go() -> None:
        guard, _ = make()
        w = await guard.create_waiver(task_type="code", extra_tokens=100, reason="launch", approver="alice", expires_at=T0 + 3600, now=T0)
        assert w.id == "WV-0001"
        await fill(guard, 880)  # effective 1100, gate 880
        other_task = await pick(guard, BIG, task="chat")
        assert other_task.refused == "waiver_required"
        await guard.release(other_task.reservation, T0)
        unsure = await pick(guard, BIG, task="code", conf=0.69)
        assert unsure.refused == "confidence_low" and unsure.arm == SMALL
        await guard.release(unsure.reservation, T0)
        no_conf = await pick(guard, BIG, task="code", conf=None)
        assert no_conf.refused == "confidence_low"
        await guard.release(no_conf.reservation, T0)
        sure = await pick(guard, BIG, task="code", conf=0.7)
        assert (sure.arm, sure.reason, sure.waiver_id, sure.effective_limit) == (BIG, "chosen", "WV-0001", 1100)
        assert "waiver:WV-0001" in sure.notes

    run(go())


def test_star_waiver_covers_every_task_type() -> None:
    async def go() -> None:
        guard, _ = make()
        await guard.create_waiver(task_type="*", extra_tokens=1000, reason="r", approver="a", expires_at=T0 + 10, now=T0)
        await fill(guard, 1600)  # effective 2000, gate 1600
        v = await pick(guard, BIG, task="anything")
        assert (v.arm, v.waiver_id) == (BIG, "WV-0001")

    run(go())


def test_low_confidence_is_fine_outside_the_waiver_zone() -> None:
    async def go() -> None:
        guard, _ = make()
        v = await pick(guard, BIG, conf=0.01)
        assert (v.arm, v.reason) == (BIG, "chosen")

    run(go())


def test_warning_exactly_at_90_percent_after_reserving() -> None:
    async def go() -> None:
        guard, _ = make()
        await fill(guard, 799)
        v = await pick(guard, BASE)  # 899
        assert not v.warning
        await fill(guard, 1)
        await guard.release(v.reservation, T0)
        v = await pick(guard, BASE)  # 800 + 100 = 900
        assert v.warning and not v.exhausted and v.fill == pytest.approx(0.9)
        assert "budget:warning" in v.notes

    run(go())


def test_exactly_full_fits_and_then_baseline_flows_with_overrun_counted() -> None:
    async def go() -> None:
        guard, _ = make()
        await fill(guard, 900)
        last = await pick(guard, BASE)  # 1000 of 1000: fits exactly
        assert (last.reason, last.overrun, last.exhausted, last.fill) == ("chosen", False, True, 1.0)
        over = await pick(guard, BIG)
        assert (over.action, over.arm, over.reason, over.overrun) == ("send", BASE, "exhausted_baseline", True)
        assert over.reservation is not None  # the client's own traffic is still counted
        plain = await pick(guard, None)
        assert (plain.reason, plain.overrun) == ("exhausted_baseline", True)
        assert await counters(guard) == Counters(used=900, reserved=300, overruns=2)
        status = await guard.status(T0)
        assert (status.overruns, status.exhausted, status.warning) == (2, True, True)

    run(go())


def test_reject_mode_at_100_percent() -> None:
    async def go() -> None:
        guard, _ = make(on_exhausted="reject")
        await fill(guard, 1000)
        v = await pick(guard, BIG)
        assert (v.action, v.reason, v.reservation, v.exhausted) == ("reject", "exhausted_reject", None, True)
        assert (await pick(guard, None)).action == "reject"
        assert await counters(guard) == Counters(used=1000)

    run(go())


def test_per_task_limit_binds_independently() -> None:
    async def go() -> None:
        guard, _ = make(per_task_limits={"code": 300}, on_exhausted="reject")
        await fill(guard, 250, task="code")
        v = await pick(guard, BIG, task="code")  # 250 + 200 > 300 on the task key
        assert (v.arm, v.reason) == (SMALL, "cheaper_fit")
        other = await pick(guard, BIG, task="chat")
        assert other.arm == BIG
        status = await guard.status(T0)
        line = status.tasks["code"]
        assert (line.limit, line.used, line.reserved) == (300, 250, 50)
        assert line.fill == pytest.approx(1.0)
        assert (status.used, status.reserved) == (250, 250)

    run(go())


# ---- waivers ---------------------------------------------------------------------


def test_waiver_lifecycle_and_expiry_on_its_own() -> None:
    async def go() -> None:
        guard, _ = make()
        a = await guard.create_waiver(task_type="code", extra_tokens=500, reason="r", approver="alice", expires_at=T0 + 100, now=T0)
        b = await guard.create_waiver(task_type="*", extra_tokens=200, reason="r2", approver="bob", expires_at=T0 + 50, now=T0 + 1)
        assert (a.id, b.id) == ("WV-0001", "WV-0002")
        assert [w.id for w in await guard.list_waivers()] == ["WV-0002", "WV-0001"]
        assert (await guard.status(T0 + 10)).effective_limit == 1700
        assert (await guard.status(T0 + 50)).effective_limit == 1500  # b expired at exactly 50
        assert b.status(T0 + 50) == "expired"
        revoked = await guard.revoke_waiver("WV-0001", now=T0 + 60, by="carol")
        assert revoked is not None and revoked.revoked_by == "carol"
        assert (await guard.status(T0 + 60)).effective_limit == 1000
        assert (await guard.status(T0 + 60)).active_waivers == []
        assert await guard.revoke_waiver("WV-9999", now=T0, by="x") is None
        assert len(await guard.list_waivers()) == 2  # history kept

    run(go())


def test_waiver_validation() -> None:
    async def go() -> None:
        guard, _ = make()
        for kw in (
            {"task_type": "", "extra_tokens": 1, "reason": "r", "approver": "a", "expires_at": T0 + 1},
            {"task_type": "x", "extra_tokens": 0, "reason": "r", "approver": "a", "expires_at": T0 + 1},
            {"task_type": "x", "extra_tokens": 1, "reason": " ", "approver": "a", "expires_at": T0 + 1},
            {"task_type": "x", "extra_tokens": 1, "reason": "r", "approver": "", "expires_at": T0 + 1},
            {"task_type": "x", "extra_tokens": 1, "reason": "r", "approver": "a", "expires_at": T0},
        ):
            with pytest.raises(ValueError):
                await guard.create_waiver(now=T0, **kw)  # type: ignore[arg-type]

    run(go())


def test_waiver_expiry_changes_the_zone_for_decisions() -> None:
    async def go() -> None:
        guard, _ = make()
        await guard.create_waiver(task_type="chat", extra_tokens=1000, reason="r", approver="a", expires_at=T0 + 100, now=T0)
        await fill(guard, 900)  # 45 % of 2000 while the waiver lives, 90 % of 1000 after
        assert (await pick(guard, BIG, conf=0.1, now=T0 + 99)).arm == BIG
        after = await pick(guard, BIG, now=T0 + 100)
        assert after.refused == "waiver_required"

    run(go())


def test_other_instances_see_waivers_after_the_cache_period() -> None:
    async def go() -> None:
        store = InProcessStore()
        settings = CawsSettings(budget_limit=1000, waiver_cache_s=5.0)
        a, b = BudgetGuard(settings, store), BudgetGuard(settings, store)
        await fill(a, 800)
        assert (await pick(b, BIG, now=T0)).refused == "waiver_required"  # b caches "no waivers"
        await a.create_waiver(task_type="*", extra_tokens=300, reason="r", approver="x", expires_at=T0 + 99, now=T0)
        stale = await pick(b, BIG, now=T0 + 4.9)  # 850 of 1000 as far as b knows
        assert (stale.refused, stale.effective_limit) == ("waiver_required", 1000)
        fresh = await pick(b, BIG, now=T0 + 5.0)  # 900 of 1300: below the gate (1040)
        assert (fresh.arm, fresh.effective_limit, fresh.waiver_zone) == (BIG, 1300, False)

    run(go())


# ---- fail-safe ----------------------------------------------------------------------


class BrokenStore(InProcessStore):
    async def budget_reserve(self, *a: Any, **k: Any) -> ReserveResult:
        raise ConnectionError("redis down")

    async def budget_settle(self, *a: Any, **k: Any) -> None:
        raise ConnectionError("redis down")


class SlowStore(InProcessStore):
    async def budget_reserve(self, *a: Any, **k: Any) -> ReserveResult:
        await asyncio.sleep(1.0)
        raise AssertionError("unreachable")


def test_unreachable_store_fails_safe() -> None:
    async def go() -> None:
        for store in (BrokenStore(), SlowStore()):
            strict = BudgetGuard(CawsSettings(store_timeout_s=0.01), store, require_caws=True)
            v = await pick(strict, BIG)
            assert (v.arm, v.reason, v.guard_ok, v.enforced, v.reservation) == (BASE, "guard_unavailable", False, False, None)
            lax = BudgetGuard(CawsSettings(store_timeout_s=0.01), store, require_caws=False)
            assert (await pick(lax, BIG)).arm == BIG
        assert not await BudgetGuard(CawsSettings(), BrokenStore()).settle((await pick(make()[0], BIG)).reservation, 10, T0)

    run(go())


def test_unreachable_store_under_reject_refuses_instead_of_sending_unbudgeted() -> None:
    async def go() -> None:
        for store in (BrokenStore(), SlowStore()):
            for require in (True, False):
                guard = BudgetGuard(CawsSettings(store_timeout_s=0.01, on_exhausted="reject"), store, require_caws=require)
                v = await pick(guard, BIG)
                assert (v.action, v.reason, v.guard_ok, v.enforced, v.reservation) == ("reject", "guard_unavailable", False, False, None)

    run(go())


def test_disabled_caws() -> None:
    async def go() -> None:
        store = InProcessStore()
        v = await pick(BudgetGuard(CawsSettings(enabled=False), store), BIG)
        assert (v.arm, v.reason, v.enforced, v.guard_ok) == (BASE, "disabled", False, True)
        v = await pick(BudgetGuard(CawsSettings(enabled=False), store, require_caws=False), BIG)
        assert v.arm == BIG

    run(go())


# ---- concurrency ----------------------------------------------------------------------


class YieldingStore(InProcessStore):
    """Gives the event loop a chance to interleave before every store call, like a network hop."""

    async def budget_reserve(
        self, keys: Sequence[BudgetKey], candidates: Sequence[Candidate], *, now: float, expires_at: float
    ) -> ReserveResult:
        await asyncio.sleep(0)
        return await super().budget_reserve(keys, candidates, now=now, expires_at=expires_at)

    async def budget_settle(self, keys: Sequence[str], reserved: int, actual: int, *, now: float, expires_at: float) -> None:
        await asyncio.sleep(0)
        await super().budget_settle(keys, reserved, actual, now=now, expires_at=expires_at)


@pytest.mark.parametrize("on_exhausted", ["reject", "baseline"])
def test_thousand_concurrent_requests_never_settle_above_the_limit(on_exhausted: str) -> None:
    per_request = 50 + 150  # prompt estimate + max_tokens of the baseline
    limit = 100 * per_request
    store: StateStore = YieldingStore()
    guard = BudgetGuard(CawsSettings(budget_limit=limit, on_exhausted=on_exhausted), store)  # type: ignore[arg-type]
    base = Arm(0.7, 150)
    allowed = [Arm(0.7, 100), base, Arm(0.9, 200)]
    rng = random.Random(7)
    peak = 0

    async def one(i: int) -> BudgetVerdict:
        nonlocal peak
        v = await guard.decide(
            allowed=allowed,
            chosen=rng.randrange(3),
            baseline=base,
            task_type="t",
            prompt_tokens=50,
            confidence=rng.random(),
            now=T0 + i * 1e-3,
        )
        c = (await store.budget_read([f"caws:{guard.window_start(T0)}:all"], now=T0))[0]
        if not v.overrun:
            peak = max(peak, c.total)
        await asyncio.sleep(0)
        if v.reservation is not None:
            if i % 10 == 0:
                await guard.release(v.reservation, T0 + 1)  # failed upstream
            else:
                await guard.settle(v.reservation, v.reservation.tokens - rng.randrange(0, 30), T0 + 1)
        return v

    async def go() -> list[BudgetVerdict]:
        return await asyncio.gather(*(one(i) for i in range(1000)))

    verdicts = run(go())
    final = run(store.budget_read([f"caws:{guard.window_start(T0)}:all"], now=T0))[0]
    overruns = [v for v in verdicts if v.overrun]
    assert final.reserved == 0
    if on_exhausted == "reject":
        assert final.used <= limit
        assert final.overruns == 0 and not overruns
        assert sum(v.action == "reject" for v in verdicts) > 0
    else:
        # Only the client's own parameters go past the limit, and each such request is counted.
        assert all(v.arm == base for v in overruns)
        assert final.overruns == len(overruns) > 0
        assert final.used - sum(v.reservation.tokens for v in overruns if v.reservation) <= limit
    assert peak <= limit


# ---- a budget in dollars (caws.unit = "usd", docs/cost.md) ------------------------------------------


def test_dollar_budget_reserves_at_the_models_price_and_settles_the_real_cost() -> None:
    from policies.pricing import flat

    rates = flat(2.0, 8.0)  # $ per million input / output tokens
    # $0.01 = 10,000 micro-dollars. Reservation: 500 prompt · 2 + 200 cap · 8 = 2,600 micro-dollars (by hand).
    guard, _ = make(0.01, unit="usd")  # type: ignore[arg-type]

    async def go() -> None:
        v = await guard.decide(allowed=ARMS, chosen=2, baseline=BASE, task_type="chat", prompt_tokens=500, confidence=1.0, now=T0, rates=rates)
        assert v.action == "send" and v.arm == BIG and v.reservation is not None and v.reservation.tokens == 2600
        assert v.effective_limit == 10_000
        spent = guard.spent(480, 120, (480 * 2.0 + 120 * 8.0) / 1e6)  # the real cost: 960 + 960 = 1,920 micro-dollars
        assert spent == 1920
        await guard.settle(v.reservation, spent, T0)
        c = await counters(guard)
        assert (c.used, c.reserved) == (1920, 0)
        # 8,080 left: the big arm (2,600) fits three more times, then only the baseline (500·2 + 100·8 = 1,800), then nothing
        for _ in range(3):
            v = await guard.decide(allowed=ARMS, chosen=2, baseline=BASE, task_type="chat", prompt_tokens=500, confidence=1.0, now=T0, rates=rates)
            assert v.reservation is not None and v.reservation.tokens == 2600
        st = await guard.status(T0)
        assert (st.limit, st.used, st.reserved) == (10_000, 1920, 7800)

    run(go())


@pytest.mark.parametrize(("on_exhausted", "action"), [("reject", "reject"), ("baseline", "send")])
def test_dollar_budget_without_a_price_is_never_counted_as_free(on_exhausted: str, action: str) -> None:
    guard, _ = make(0.01, unit="usd", on_exhausted=on_exhausted)  # type: ignore[arg-type]
    v = run(guard.decide(allowed=ARMS, chosen=2, baseline=BASE, task_type="chat", prompt_tokens=5, confidence=1.0, now=T0, rates=None))
    assert v.action == action and v.reason == "unpriced" and v.reservation is None and not v.enforced
    if action == "send":
        assert v.arm == BASE  # under require_caws the client's own parameters go, unbudgeted
    assert guard.spent(10, 10, None) is None  # usage without a price: the caller settles the reservation instead


def test_token_budget_spent_is_prompt_plus_completion() -> None:
    guard, _ = make(1000)
    assert guard.spent(30, 12, 99.0) == 42 and guard.spent(None, 5, None) == 5 and guard.spent(None, None, None) is None


def test_dollar_budget_zones_waivers_and_reject_work_as_for_tokens() -> None:
    """The 80 % waiver zone, the 90 % warning, a waiver and `reject` at 100 % on a dollar budget (issue 25,
    item 3). At $0 / $1 per million input / output tokens an arm's reservation is its cap in micro-dollars, so the
    figures are the token tests' above: $0.001 = 1,000 micro-dollars."""
    from policies.pricing import flat

    one = flat(0.0, 1.0)  # 1 micro-dollar per output token

    async def spend(guard: BudgetGuard, micro: int, task: str = "chat") -> None:
        v = await guard.decide(allowed=[Arm(0.7, micro)], chosen=None, baseline=Arm(0.7, micro), task_type=task, prompt_tokens=0,
                               confidence=None, now=T0, rates=one)
        assert v.reservation is not None and v.reservation.tokens == micro
        await guard.settle(v.reservation, guard.spent(0, micro, micro / 1e6), T0)  # type: ignore[arg-type]

    async def choose(guard: BudgetGuard, chosen: Arm, task: str = "chat", conf: float | None = 1.0) -> BudgetVerdict:
        return await guard.decide(allowed=ARMS, chosen=ARMS.index(chosen), baseline=BASE, task_type=task, prompt_tokens=0,
                                  confidence=conf, now=T0, rates=one)

    async def go() -> None:
        guard, _ = make(0.001, unit="usd", on_exhausted="reject")  # type: ignore[arg-type]
        await spend(guard, 799)
        below = await choose(guard, BIG)
        assert (below.arm, below.reason, below.waiver_zone) == (BIG, "chosen", False)
        await guard.release(below.reservation, T0)
        await spend(guard, 1)  # 800 of 1,000 micro-dollars: the waiver zone
        at = await choose(guard, BIG)
        assert at.waiver_zone and at.refused == "waiver_required" and (at.arm, at.reason) == (SMALL, "cheaper_fit")
        await guard.release(at.reservation, T0)
        warned = await choose(guard, BASE)  # 800 + 100 = 900: the warning
        assert warned.warning and not warned.exhausted and warned.fill == pytest.approx(0.9) and "budget:warning" in warned.notes
        await guard.release(warned.reservation, T0)
        # a waiver's extra counts micro-dollars here: 100 more makes the limit 1,100 and the gate 880, unlocked for "code"
        await guard.create_waiver(task_type="code", extra_tokens=100, reason="launch", approver="alice", expires_at=T0 + 3600, now=T0)
        await spend(guard, 80)  # 880
        waived = await choose(guard, BIG, task="code")
        assert (waived.arm, waived.reason, waived.waiver_id, waived.effective_limit) == (BIG, "chosen", "WV-0001", 1100)
        await guard.release(waived.reservation, T0)
        other = await choose(guard, BIG, task="chat")
        assert other.refused == "waiver_required"  # the waiver is for "code" only
        await guard.release(other.reservation, T0)
        await spend(guard, 220)  # 1,100: the limit with the waiver's extra, spent
        full = await choose(guard, SMALL)
        assert (full.action, full.reason, full.reservation) == ("reject", "exhausted_reject", None)
        assert await counters(guard) == Counters(used=1100)
        status = await guard.status(T0)
        assert (status.used, status.exhausted, status.warning) == (1100, True, True), status

    run(go())
