"""Budget leases (guards/lease.py) over the in-process store, with an injected clock.

The refill task's role is played by hand here: `plan` -> `store.budget_lease` ->
`apply` (or `failed`, for a lost reply), so every step and number is visible.
"""

from __future__ import annotations

import math
import random
from typing import Any

from guards.budget import BudgetGuard
from guards.lease import LeaseBook
from guards.settings import CawsSettings
from guards.state import BudgetKey, Candidate, Counters, InProcessStore, LeaseCall
from policies.records import Arm

T0 = 1_000_000.0
KEY = BudgetKey("caws:0:all", 1000, 800)
EXP = T0 + 1000


def settings(**kw: Any) -> CawsSettings:
    kw.setdefault("budget_limit", KEY.limit)
    kw.setdefault("waiver_cache_s", 0.0)
    return CawsSettings(**kw)


async def refill(book: LeaseBook, store: InProcessStore, now: float, *, lose: bool = False, closing: bool = False) -> list[LeaseCall]:
    """One round of the background task; `lose` applies the calls in the store but drops the replies."""
    calls = book.plan(now, closing=closing)
    for call in calls:
        grant = await store.budget_lease(call, now=now)
        if lose:
            book.failed(call)
        else:
            book.apply(call, grant)
    return calls


async def counters(store: InProcessStore, now: float = T0) -> Counters:
    return (await store.budget_read([KEY.key], now=now))[0]


async def test_requests_are_admitted_from_the_lease_without_store_calls() -> None:
    store, book = InProcessStore(), LeaseBook(settings(), "a")
    assert book.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP) is None  # no lease yet
    assert book.wakeup.is_set()
    (call,) = await refill(book, store, T0)
    # spend so far 100, one request of 100: the lease aims at 100 free; the store has 1000 left
    assert (call.target, call.min_amount) == (100, 100)
    assert await counters(store) == Counters(0, 100, 0)  # the lease counts as reserved
    got = book.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP, retry=True)
    assert got is not None and got.index == 0
    assert book.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP) is None  # lease used up; store untouched
    assert await counters(store) == Counters(0, 100, 0)


async def test_the_cap_is_on_actual_tokens_and_usage_reaches_the_store() -> None:
    store, book = InProcessStore(), LeaseBook(settings(), "a")
    book.reserve([KEY], [Candidate(300)], now=T0, expires_at=EXP)
    await refill(book, store, T0)
    r = book.reserve([KEY], [Candidate(300)], now=T0, expires_at=EXP, retry=True)
    assert r is not None and r.index == 0
    book.settle([KEY.key], 300, 120)  # used 120 of the 300 it reserved: 180 free again at once
    assert book.held_tokens() == 180
    calls = await refill(book, store, T0 + 0.1)
    assert calls[0].used_total == 120
    c = await counters(store, T0 + 0.1)
    assert c.used == 120  # the actual usage, reported
    assert c.reserved == calls[0].target  # our lease: held 0 + the free tokens we want
    # a request that used more than it reserved (an undercounted prompt) is charged in full
    r = book.reserve([KEY], [Candidate(100)], now=T0 + 0.2, expires_at=EXP)
    assert r is not None
    book.settle([KEY.key], 100, 150)
    await refill(book, store, T0 + 0.3)
    assert (await counters(store, T0 + 0.3)).used == 270


async def test_lost_replies_are_repeated_without_double_counting() -> None:
    store, book = InProcessStore(), LeaseBook(settings(), "a")
    book.reserve([KEY], [Candidate(200)], now=T0, expires_at=EXP)
    await refill(book, store, T0)
    assert book.reserve([KEY], [Candidate(200)], now=T0, expires_at=EXP, retry=True) is not None
    book.settle([KEY.key], 200, 200)
    await refill(book, store, T0 + 0.1, lose=True)  # the store applied it; we never heard
    await refill(book, store, T0 + 0.2, lose=True)
    await refill(book, store, T0 + 0.3)
    c = await counters(store, T0 + 0.3)
    assert c.used == 200  # reported three times, counted once
    assert c.reserved == book._leases[KEY.key].amount  # and both sides agree on the lease


async def test_a_lease_that_gives_back_is_lowered_before_the_call() -> None:
    store, book = InProcessStore(), LeaseBook(settings(lease_horizon_s=2.0), "a")
    for _ in range(5):
        book.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP)
    await refill(book, store, T0)
    assert book.held_tokens() == 250  # five requests of 100 asked, capped at a quarter of the 1,000 left
    # idle for a whole horizon: everything goes back, and locally before the store answers
    calls = book.plan(T0 + 2.5)
    assert calls[0].target == 0 and book.held_tokens() == 0
    book.failed(calls[0])  # even if the reply is lost, we never admit from what we gave back
    assert book.reserve([KEY], [Candidate(1)], now=T0 + 2.5, expires_at=EXP) is None
    await refill(book, store, T0 + 5)
    assert await counters(store, T0 + 5) == Counters(0, 0, 0)
    assert book.keys() == [KEY.key] and book.plan(T0 + 5.1) == [] and book.keys() == []  # nothing held or owed: dropped


async def test_lease_size_follows_recent_spend_and_shrinks_near_the_limit() -> None:
    book = LeaseBook(settings(lease_horizon_s=2.0, lease_share=0.25), "a")
    key = BudgetKey("k", 100_000, 80_000)
    for i in range(10):
        book.reserve([key], [Candidate(100)], now=T0 + i * 0.1, expires_at=EXP)
    lease = book._leases["k"]
    # decayed sum at T0+0.9: sum of 100 * exp(-(0.9 - 0.1 i) / 2) for i = 0..9
    expected = sum(100 * math.exp(-(0.9 - 0.1 * i) / 2) for i in range(10))
    assert book.target_free(lease, T0 + 0.9) == math.ceil(expected)
    # near the limit: at most a quarter of what is left (store says 99,000 taken by others)
    lease.store = Counters(used=99_000, reserved=0)
    assert book.target_free(lease, T0 + 0.9) == 250  # ceil(0.25 * 1,000)
    # ...but never less than one request, or the last tokens could never be used
    lease.store = Counters(used=99_800, reserved=0)
    assert book.target_free(lease, T0 + 0.9) == 100
    assert book.target_free(lease, T0 + 0.9 + 2.0) == 0  # idle for a horizon


async def test_a_grant_too_small_for_the_waiting_request_is_not_taken() -> None:
    store, book = InProcessStore(), LeaseBook(settings(), "a")
    await store.budget_reserve([KEY], [Candidate(950)], now=T0, expires_at=EXP)  # someone holds 950
    assert book.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP) is None
    await refill(book, store, T0)
    assert await counters(store) == Counters(0, 950, 0)  # 50 left: not stranded on this replica
    assert book.exhausted([KEY], T0)  # the store said so: no point waiting


async def test_an_unrenewed_lease_stops_admitting_and_the_store_reclaims_it_later() -> None:
    s = settings(lease_ttl_s=10.0)
    store, a, b = InProcessStore(), LeaseBook(s, "a"), LeaseBook(s, "b")
    a.reserve([KEY], [Candidate(600)], now=T0, expires_at=EXP)
    await refill(a, store, T0)
    assert a.reserve([KEY], [Candidate(1)], now=T0 + 9.9, expires_at=EXP, retry=True) is not None
    assert a.reserve([KEY], [Candidate(1)], now=T0 + 10.0, expires_at=EXP, retry=True) is None  # no contact for ttl
    b.reserve([KEY], [Candidate(600)], now=T0 + 15, expires_at=EXP)
    await refill(b, store, T0 + 15)
    assert b.held_tokens() == 0  # a's lease is still counted until twice the ttl
    b.reserve([KEY], [Candidate(600)], now=T0 + 20, expires_at=EXP)
    await refill(b, store, T0 + 20)
    assert b.held_tokens() == 600  # reclaimed from a, granted to b
    assert await counters(store, T0 + 20) == Counters(0, 600, 0)


def random_request(rng: random.Random, books: list[LeaseBook], in_flight: list[tuple[LeaseBook, int, int]], now: float, most: int) -> int:
    """A request of 20..`most` tokens on a random book (actual usage 1..reserved), and maybe one in flight
    finishing; returns the tokens that finishing one used."""
    book = rng.choice(books)
    tokens = rng.randint(20, most)
    if book.reserve([KEY], [Candidate(tokens)], now=now, expires_at=EXP) is not None:
        in_flight.append((book, tokens, rng.randint(1, tokens)))
    if in_flight and rng.random() < 0.5:
        owner, reserved, actual = in_flight.pop(rng.randrange(len(in_flight)))
        owner.settle([KEY.key], reserved, actual)
        return actual
    return 0


async def test_replicas_never_serve_more_than_the_limit_in_actual_tokens() -> None:
    """Three books on one store; random request sizes, actual <= reserved, lost replies, early
    settles; the store's used plus every lease's unreported usage never passes the limit."""
    rng = random.Random(7)
    store = InProcessStore()
    books = [LeaseBook(settings(lease_share=0.25), name) for name in "abc"]
    served = 0
    in_flight: list[tuple[LeaseBook, int, int]] = []
    now = T0
    for step in range(3000):
        now += 0.01
        served += random_request(rng, books, in_flight, now, 200)
        if step % 7 == 0:
            await refill(rng.choice(books), store, now, lose=rng.random() < 0.2)
        c = await counters(store, now)
        assert c.used + c.reserved <= KEY.limit
    for owner, reserved, actual in in_flight:
        owner.settle([KEY.key], reserved, actual)
        served += actual
    for book in books:
        await refill(book, store, now + 0.01, closing=True)
    c = await counters(store, now + 0.01)
    assert c.used == served <= KEY.limit and c.reserved == 0
    assert served >= KEY.limit - 200  # nothing stranded beyond what one request (up to 200) could not fit anyway


async def test_guard_with_leases_rejects_rather_than_sending_unbudgeted() -> None:
    s = settings(on_exhausted="reject", store_timeout_s=0.01)
    guard = BudgetGuard(s, InProcessStore(), leases=LeaseBook(s, "a"))
    v = await guard.decide(allowed=[Arm(0.7, 100)], chosen=None, baseline=Arm(0.7, 100), task_type="chat", prompt_tokens=10, confidence=None, now=T0)
    assert (v.action, v.reason, v.enforced) == ("reject", "guard_unavailable", False)  # no refill ever answered


async def test_guard_with_leases_counts_overruns_under_baseline() -> None:
    s = settings(budget_limit=150, on_exhausted="baseline")
    store = InProcessStore()
    book = LeaseBook(s, "a")
    guard = BudgetGuard(s, store, leases=book)
    base = Arm(0.7, 100)
    key = BudgetKey(f"caws:{guard.window_start(T0)}:all", 150, 120)

    async def one() -> Any:
        return await guard.decide(allowed=[base], chosen=None, baseline=base, task_type="chat", prompt_tokens=0, confidence=None, now=T0)

    book.reserve([key], [Candidate(100)], now=T0, expires_at=EXP)
    await refill(book, store, T0)
    first = await one()
    assert (first.reason, first.reservation.leased) == ("baseline", True)  # type: ignore[union-attr]
    assert book.reserve([key], [Candidate(100)], now=T0, expires_at=EXP) is None  # the next one finds the lease short
    await refill(book, store, T0)  # and the store has only 50 left: not enough for 100, so nothing is granted
    assert book.exhausted([key], T0)
    second = await one()
    assert (second.action, second.reason, second.overrun) == ("send", "exhausted_baseline", True)
    await guard.settle(second.reservation, 100, T0)
    await guard.settle(first.reservation, 100, T0)
    await refill(book, store, T0 + 0.1)
    c = (await store.budget_read([key.key], now=T0 + 0.1))[0]
    assert (c.used, c.overruns) == (200, 1)  # overrun counted, as without leases


# ---- issue 21: accounting across idle periods, oversized refusals, lost store state, killed replicas ----


async def serve(book: LeaseBook, store: InProcessStore, tokens: int, actual: int, now: float) -> bool:
    """One request through the book as the guard runs it: reserve, else one refill round and retry."""
    r = book.reserve([KEY], [Candidate(tokens)], now=now, expires_at=EXP)
    if r is None and not book.exhausted([KEY], now):
        await refill(book, store, now)
        r = book.reserve([KEY], [Candidate(tokens)], now=now, expires_at=EXP, retry=True)
    if r is None or r.index is None:
        book.reserve_exhausted([KEY], [Candidate(tokens)], now=now, expires_at=EXP)  # refused
        return False
    book.settle([KEY.key], tokens, actual)
    return True


async def test_usage_after_an_idle_gap_is_counted() -> None:
    """A lease handed back after `lease_horizon_s` idle and taken again keeps counting (was: the new
    lease counted from 0 and the store ignored it until it passed the old total: 3.3x the cap)."""
    store, book = InProcessStore(), LeaseBook(settings(lease_horizon_s=2.0), "a")
    now, served = T0, 0
    for burst in range(6):
        for _ in range(3):
            served += 100 * await serve(book, store, 100, 100, now)
            now += 0.01
        await refill(book, store, now)  # reports the burst
        now += 4.5  # idle for longer than the horizon: the lease goes back, the record is kept
        await refill(book, store, now)
        assert book.plan(now + 0.1) == [] and book.keys() == []  # nothing held or owed
        assert (await counters(store, now)).used == served, burst
    assert served == KEY.limit  # ten requests of 100 fit, the rest were refused
    assert (await counters(store, now)) == Counters(KEY.limit, 0, 0)


async def test_a_refused_oversized_request_does_not_stop_later_top_ups() -> None:
    """One request too big for what is left is refused; the smaller ones after it are still served
    until the budget is really spent (was: the lease kept its size and was never topped up again)."""
    store, book = InProcessStore(), LeaseBook(settings(on_exhausted="reject"), "a")
    now = T0
    for _ in range(3):
        assert await serve(book, store, 100, 100, now)
        now += 0.05
    assert not await serve(book, store, 900, 900, now)  # 300 used: 900 does not fit
    served = 300
    for _ in range(20):
        now += 0.05
        served += 100 * await serve(book, store, 100, 100, now)
    await refill(book, store, now + 0.05)
    assert served == KEY.limit
    assert (await counters(store, now + 0.05)).used == KEY.limit


async def test_a_killed_replicas_in_flight_reservations_are_counted_when_its_lease_is_reclaimed() -> None:
    s = settings(lease_ttl_s=1.0)
    store, a, b = InProcessStore(), LeaseBook(s, "a"), LeaseBook(s, "b")
    for _ in range(3):
        a.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP)
    await refill(a, store, T0)
    for _ in range(2):
        assert a.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP, retry=True) is not None
    await refill(a, store, T0 + 0.2)  # its last call: 200 in flight; then it is killed with -9
    assert await serve(b, store, 100, 100, T0 + 1.0)
    await refill(b, store, T0 + 2.2)  # a's lease expired (2 x ttl): its 200 in flight count as used
    c = await counters(store, T0 + 2.2)
    assert c.used == 200 + 100
    assert c.reserved == b._leases[KEY.key].amount  # the rest of a's lease went back


async def test_a_replica_that_comes_back_is_counted_once() -> None:
    """The charge for a reclaimed lease is provisional: the holder's own report replaces it."""
    s = settings(lease_ttl_s=1.0)
    store, a, b = InProcessStore(), LeaseBook(s, "a"), LeaseBook(s, "b")
    a.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP)
    await refill(a, store, T0)
    assert a.reserve([KEY], [Candidate(100)], now=T0, expires_at=EXP, retry=True) is not None
    await refill(a, store, T0 + 0.1, lose=True)  # 100 in flight; the store hears, a does not; then a partition
    assert await serve(b, store, 100, 100, T0 + 2.5)
    await refill(b, store, T0 + 2.6)
    assert (await counters(store, T0 + 2.6)).used == 100 + 100  # a's in-flight 100 charged, b's 100
    a.settle([KEY.key], 100, 60)  # the request used 60
    await refill(a, store, T0 + 3.0)
    assert (await counters(store, T0 + 3.0)).used == 60 + 100  # a's own report replaces the charge


async def test_lost_store_state_is_rebuilt_without_granting_past_the_limit() -> None:
    """Three replicas; the store loses everything mid-window (a Redis flush). Random traffic with
    lost replies and idle gaps: actual usage never passes the limit, and once every replica has
    reported, the rebuilt store counts every token."""
    rng = random.Random(11)
    s = settings(lease_ttl_s=1.0, lease_horizon_s=0.5)
    for flush_at in (400, 700, 900):
        store = InProcessStore()
        books = [LeaseBook(s, name) for name in "abc"]
        served, now = 0, T0
        in_flight: list[tuple[LeaseBook, int, int]] = []
        for step in range(3000):
            now += 0.01 if step % 500 else 1.5  # now and then an idle gap longer than every lease timer
            if step == flush_at:
                store = InProcessStore()  # everything lost, leases included
            served += random_request(rng, books, in_flight, now, 120)
            if step % 3 == 0:
                await refill(rng.choice(books), store, now, lose=rng.random() < 0.1)
            assert served <= KEY.limit, (flush_at, step)
        for owner, reserved, actual in in_flight:
            owner.settle([KEY.key], reserved, actual)
            served += actual
        assert served <= KEY.limit
        for book in books:
            await refill(book, store, now + 0.01, closing=True)
        assert (await counters(store, now + 0.01)) == Counters(served, 0, 0)  # every token, counted once


async def test_the_reply_to_a_give_back_does_not_refuse_a_request_that_came_meanwhile() -> None:
    """Found with the traffic tests: a lease going idle sends a give-back; a request that arrives
    before the reply must wait for a top-up, not be refused as if the store had said no."""
    store, book = InProcessStore(), LeaseBook(settings(lease_horizon_s=0.3), "a")
    assert await serve(book, store, 100, 100, T0)
    (give_back,) = book.plan(T0 + 0.5)  # idle: everything goes back
    assert give_back.target == 0
    assert book.reserve([KEY], [Candidate(100)], now=T0 + 0.5, expires_at=EXP) is None  # arrives meanwhile
    book.apply(give_back, await store.budget_lease(give_back, now=T0 + 0.5))
    assert not book.exhausted([KEY], T0 + 0.5)  # keeps waiting: the next call asks for it
    await refill(book, store, T0 + 0.5)
    assert book.reserve([KEY], [Candidate(100)], now=T0 + 0.5, expires_at=EXP, retry=True) is not None
