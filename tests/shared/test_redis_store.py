"""RedisStore against the in-process store's contract (same scenarios as tests/guards/test_guards_state.py).

Every scenario runs against both implementations, so the Redis version is held to
exactly the semantics the guards were written for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis

from guards.state import BudgetKey, Candidate, Counters, InProcessStore, LeaseCall, LeaseGrant, StateStore, StoreUnavailable
from proxy.store import RedisStore
from tests.shared.conftest import REDIS_URL


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield InProcessStore(prune_every_s=0.0)
        return
    prefix = request.getfixturevalue("redis_prefix")
    s = RedisStore(REDIS_URL, prefix=prefix, timeout_s=2.0)
    yield s
    await s.aclose()


async def test_is_a_state_store(redis_store: RedisStore) -> None:
    assert isinstance(redis_store, StateStore)


async def test_reserve_first_candidate_that_fits_every_key(store: StateStore) -> None:
    keys = [BudgetKey("all", 1000, 800), BudgetKey("task", 100, 80)]
    r = await store.budget_reserve(keys, [Candidate(150), Candidate(60), Candidate(10)], now=0, expires_at=10)
    assert r.index == 1 and not r.overrun
    assert r.before == (Counters(), Counters()) and r.after == (Counters(0, 60), Counters(0, 60))
    r = await store.budget_reserve(keys, [Candidate(60), Candidate(40)], now=0, expires_at=10)
    assert r.index == 1  # 60 + 40 = 100: exactly the limit fits
    r = await store.budget_reserve(keys, [Candidate(1)], now=0, expires_at=10)
    assert r.index is None and r.after == r.before
    assert r.before == (Counters(0, 100), Counters(0, 100))


async def test_gate_refuses_gated_candidates_from_the_gate_on(store: StateStore) -> None:
    keys = [BudgetKey("k", 100, 80)]
    await store.budget_reserve(keys, [Candidate(79)], now=0, expires_at=10)
    assert (await store.budget_reserve(keys, [Candidate(1, gated=True)], now=0, expires_at=10)).index == 0
    assert (await store.budget_reserve(keys, [Candidate(1, gated=True), Candidate(2)], now=0, expires_at=10)).index == 1


async def test_forced_candidate_counts_overruns_per_key(store: StateStore) -> None:
    keys = [BudgetKey("a", 100, 80), BudgetKey("b", 1000, 800)]
    r = await store.budget_reserve(keys, [Candidate(150, force=True)], now=0, expires_at=10)
    assert r.index == 0 and r.overrun
    assert r.after == (Counters(0, 150, 1), Counters(0, 150, 0))
    assert await store.budget_read(["a", "b"], now=1) == r.after


async def test_settle_release_and_expiry(store: StateStore) -> None:
    keys = [BudgetKey("w1", 1000, 800)]
    await store.budget_reserve(keys, [Candidate(300)], now=0, expires_at=10)
    await store.budget_settle(["w1"], 300, 250, now=1, expires_at=10)
    await store.budget_reserve(keys, [Candidate(100)], now=2, expires_at=10)
    await store.budget_release(["w1"], 100, now=3)
    assert await store.budget_read(["w1", "nope"], now=4) == (Counters(250, 0, 0), Counters())
    assert await store.budget_read(["w1"], now=10) == (Counters(),)  # expired (on the caller's clock)
    # a write after expiry starts the key from zero
    r = await store.budget_reserve(keys, [Candidate(5)], now=11, expires_at=20)
    assert r.before == (Counters(),) and r.after == (Counters(0, 5),)
    await store.budget_release(["w1"], 5, now=12)
    await store.budget_release(["never"], 5, now=12)  # unknown key: nothing happens
    assert await store.budget_read(["w1", "never"], now=12) == (Counters(), Counters())


async def test_settle_never_drives_reserved_negative_and_keeps_later_expiry(store: StateStore) -> None:
    keys = [BudgetKey("s", 1000, 800)]
    await store.budget_reserve(keys, [Candidate(10)], now=0, expires_at=100)
    await store.budget_settle(["s"], 50, 7, now=1, expires_at=10)  # earlier expiry must not shorten the key
    assert await store.budget_read(["s"], now=50) == (Counters(7, 0, 0),)


async def test_blobs_counters_maps(store: StateStore) -> None:
    assert await store.get("x") is None
    await store.set("x", b"1")
    assert await store.get("x") == b"1"
    assert [await store.incr("seq") for _ in range(3)] == [1, 2, 3]
    assert await store.incr("seq", 5) == 8
    await store.map_put("m", "a", b"A")
    await store.map_put("m", "b", b"B")
    assert await store.map_get_all("m") == {"a": b"A", "b": b"B"}
    assert await store.map_delete("m", "a") and not await store.map_delete("m", "a")
    assert await store.map_get_all("m") == {"b": b"B"}
    assert await store.map_get_all("none") == {}


async def test_redis_keys_carry_a_ttl_and_expire(redis_store: RedisStore, sync_redis: redis.Redis) -> None:
    # TTLs are relative to the `now` passed in; the margins (1 s) absorb a loaded machine's scheduling delays.
    now = time.time()
    await redis_store.budget_reserve([BudgetKey("short", 100, 80)], [Candidate(1)], now=now, expires_at=now + 1.0)
    key = redis_store.k("short")
    ttl = sync_redis.pttl(key)
    assert 0 < ttl <= 1000
    # a later expiry extends; an earlier one does not shorten
    await redis_store.budget_settle(["short"], 1, 1, now=now, expires_at=now + 2.0)
    assert 1000 < sync_redis.pttl(key) <= 2000
    await redis_store.budget_settle(["short"], 0, 1, now=now, expires_at=now + 0.2)
    assert sync_redis.pttl(key) > 1000
    await asyncio.sleep(max(0.0, now + 2.3 - time.time()))
    assert sync_redis.exists(key) == 0  # Redis itself dropped the window key
    await redis_store.set("blob", b"v")
    assert sync_redis.pttl(redis_store.k("blob")) == -1  # blobs never expire


async def test_thousand_concurrent_reservations_never_exceed_the_limit(redis_prefix: str) -> None:
    """1,000 concurrent requests, each worth 100 tokens, against a budget of 100 requests, over 3 clients."""
    stores = [RedisStore(REDIS_URL, prefix=redis_prefix, timeout_s=5.0, max_connections=32) for _ in range(3)]
    limit = 100 * 100
    keys = [BudgetKey("caws:0:all", limit, 8000)]
    now = time.time()

    async def one(i: int) -> int | None:
        s = stores[i % 3]
        r = await s.budget_reserve(keys, [Candidate(100)], now=now, expires_at=now + 60)
        if r.index is None:
            return None
        assert r.after[0].total <= limit
        await s.budget_settle(["caws:0:all"], 100, 100, now=now, expires_at=now + 60)
        return r.index

    try:
        results = await asyncio.gather(*(one(i) for i in range(1000)))
        accepted = sum(1 for r in results if r is not None)
        assert accepted == 100
        assert await stores[0].budget_read(["caws:0:all"], now=now) == (Counters(used=limit, reserved=0, overruns=0),)
    finally:
        for s in stores:
            await s.aclose()


async def test_script_cache_survives_script_flush(redis_store: RedisStore, sync_redis: redis.Redis) -> None:
    keys = [BudgetKey("f", 10, 8)]
    await redis_store.budget_reserve(keys, [Candidate(1)], now=0, expires_at=10)
    sync_redis.script_flush()
    r = await redis_store.budget_reserve(keys, [Candidate(1)], now=0, expires_at=10)
    assert r.after == (Counters(0, 2),)


async def test_unreachable_redis_raises_store_unavailable_and_remembers_blob_writes(redis_prefix: str) -> None:
    s = RedisStore("redis://127.0.0.1:1/0", prefix=redis_prefix, timeout_s=0.2)
    try:
        with pytest.raises(StoreUnavailable):
            await s.budget_reserve([BudgetKey("k", 10, 8)], [Candidate(1)], now=0, expires_at=10)
        with pytest.raises(StoreUnavailable):
            await s.set("rollout:state", b"{}")
        assert s.unsaved == {"rollout:state": b"{}"}
        assert not await s.ping()
    finally:
        await s.aclose()


def _lease(holder: str, *, used: int = 0, overruns: int = 0, target: int = 0, minimum: int = 0, lease_exp: float = 50.0) -> LeaseCall:
    return LeaseCall(
        key="L", holder=holder, limit=1000, used_total=used, overruns_total=overruns, target=target,
        min_amount=minimum, lease_expires_at=lease_exp, expires_at=100.0, sent_at=0.0,
    )


async def test_budget_leases_grant_report_return_and_reclaim(store: StateStore) -> None:
    a = await store.budget_lease(_lease("a", target=600), now=1)
    assert a == LeaseGrant(600, Counters(0, 600, 0))  # a lease counts as reserved
    b = await store.budget_lease(_lease("b", target=600, minimum=500), now=2)
    assert b == LeaseGrant(0, Counters(0, 600, 0))  # 400 left: below b's minimum, nothing granted
    b = await store.budget_lease(_lease("b", target=600), now=2)
    assert b == LeaseGrant(400, Counters(0, 1000, 0))  # no minimum: min(requested, remaining)
    # a reports 250 used and 1 overrun, and wants 100 free: the rest of its lease goes back
    a = await store.budget_lease(_lease("a", used=250, overruns=1, target=100, lease_exp=200), now=3)
    assert a == LeaseGrant(100, Counters(250, 500, 1))
    again = await store.budget_lease(_lease("a", used=250, overruns=1, target=100, lease_exp=200), now=4)
    assert again == a  # a repeated call (its reply was lost) changes nothing
    # b stops calling; at its lease expiry another holder's call reclaims it
    c = await store.budget_lease(_lease("c", target=0), now=49.9)
    assert c.counters == Counters(250, 500, 1)
    c = await store.budget_lease(_lease("c", target=700, lease_exp=200), now=50)
    assert c == LeaseGrant(650, Counters(250, 750, 1))  # b's 400 back; 1000 - 250 - 100 = 650 granted
    # b comes back late with usage it settled before its lease stopped admitting: counted
    b = await store.budget_lease(_lease("b", used=30, target=0, lease_exp=200), now=51)
    assert b == LeaseGrant(0, Counters(280, 750, 1))
    assert await store.budget_read(["L"], now=51) == (Counters(280, 750, 1),)
    # the window key expires (on the caller's clock) with its leases
    assert await store.budget_lease(_lease("a", target=10), now=100) == LeaseGrant(10, Counters(0, 10, 0))


async def test_a_late_call_given_up_on_changes_nothing(store: StateStore) -> None:
    first = LeaseCall(key="L", holder="a", limit=1000, used_total=0, overruns_total=0, target=600, min_amount=0,
                      lease_expires_at=50.0, expires_at=100.0, sent_at=0.0, seq=1)
    second = LeaseCall(key="L", holder="a", limit=1000, used_total=100, overruns_total=0, target=0, min_amount=0,
                       lease_expires_at=50.0, expires_at=100.0, sent_at=0.0, seq=2)
    assert await store.budget_lease(second, now=1) == LeaseGrant(0, Counters(100, 0, 0))
    # the first call, given up on, reaches the store after the second: it must not grant 600 again
    assert await store.budget_lease(first, now=2) == LeaseGrant(0, Counters(100, 0, 0))
    assert await store.budget_read(["L"], now=2) == (Counters(100, 0, 0),)


async def test_a_reclaimed_lease_charges_what_was_in_flight_until_its_holder_reports(store: StateStore) -> None:
    call = LeaseCall(key="L", holder="a", limit=1000, used_total=0, overruns_total=0, target=500, min_amount=0,
                     lease_expires_at=10.0, expires_at=100.0, sent_at=0.0, seq=1, held=300)
    assert await store.budget_lease(call, now=1) == LeaseGrant(500, Counters(0, 500, 0))
    # a is killed with -9; b's call after a's lease expired reclaims it: the 300 in flight count as used
    b = await store.budget_lease(_lease("b", target=100), now=10)
    assert b == LeaseGrant(100, Counters(300, 100, 0))
    # a was only cut off: it reports 250 actually used, which replaces the charge
    back = LeaseCall(key="L", holder="a", limit=1000, used_total=250, overruns_total=0, target=0, min_amount=0,
                     lease_expires_at=60.0, expires_at=100.0, sent_at=11.0, seq=2)
    assert await store.budget_lease(back, now=11) == LeaseGrant(0, Counters(250, 100, 0))


async def test_lost_state_is_rebuilt_from_the_reports_without_new_grants(store: StateStore) -> None:
    """What a holder says after the store lost its state (Redis flush): its acknowledged usage,
    the key's `used` it last saw (others' usage stays counted) and the amount it admits from."""
    def call(holder: str, *, seq: int, used: int, target: int, seen: int, acked: int, claim: int) -> LeaseCall:
        return LeaseCall(key="L", holder=holder, limit=1000, used_total=used, overruns_total=0, target=target, min_amount=0,
                         lease_expires_at=60.0, expires_at=100.0, sent_at=0.0, seq=seq, known=True, seen_used=seen,
                         acked_used=acked, claim=claim, valid_s=5.0)

    # before the loss: a had 300 acknowledged, b 200, c (never back) 100; the key had used 600.
    # a reports 50 more and holds 100: taken back; b's and c's 300 stay counted; nothing new for 5 s
    a = await store.budget_lease(call("a", seq=7, used=350, target=300, seen=600, acked=300, claim=100), now=20)
    assert a == LeaseGrant(50, Counters(650, 50, 0), rebuilding=True)
    b = await store.budget_lease(call("b", seq=3, used=200, target=100, seen=580, acked=200, claim=80), now=21)
    assert b == LeaseGrant(80, Counters(650, 130, 0), rebuilding=True)  # b's 200 now its own, not the ghost's
    a = await store.budget_lease(call("a", seq=8, used=350, target=300, seen=650, acked=350, claim=50), now=25)
    # rebuild over: grants again, what is left (1000 - 650 - 130 = 220), c's 100 still counted
    assert a == LeaseGrant(270, Counters(650, 350, 0))


async def test_a_reserve_raises_used_to_the_callers_floor(store: StateStore) -> None:
    """`used` never falls within a window: below what the caller last saw, the store lost its state."""
    key = BudgetKey("F", 1000, 800, floor=700)
    r = await store.budget_reserve([key], [Candidate(400), Candidate(200)], now=1, expires_at=100)
    assert (r.index, r.before, r.after) == (1, (Counters(700, 0, 0),), (Counters(700, 200, 0),))
    lower = await store.budget_reserve([BudgetKey("F", 1000, 800, floor=300)], [Candidate(50)], now=2, expires_at=100)
    assert lower.after == (Counters(700, 250, 0),)  # a floor below `used` changes nothing
