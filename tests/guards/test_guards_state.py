"""InProcessStore: the semantics a Redis implementation must reproduce (reuse these tests for it)."""

from __future__ import annotations

import asyncio
from typing import Any

from guards.state import BudgetKey, Candidate, Counters, InProcessStore, StateStore


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_is_a_state_store() -> None:
    assert isinstance(InProcessStore(), StateStore)


def test_reserve_first_candidate_that_fits_every_key() -> None:
    async def go() -> None:
        s = InProcessStore()
        keys = [BudgetKey("all", 1000, 800), BudgetKey("task", 100, 80)]
        r = await s.budget_reserve(keys, [Candidate(150), Candidate(60), Candidate(10)], now=0, expires_at=10)
        assert r.index == 1 and not r.overrun
        assert r.before == (Counters(), Counters()) and r.after == (Counters(0, 60), Counters(0, 60))
        r = await s.budget_reserve(keys, [Candidate(60), Candidate(40)], now=0, expires_at=10)
        assert r.index == 1  # 60 + 40 = 100: exactly the limit fits
        r = await s.budget_reserve(keys, [Candidate(1)], now=0, expires_at=10)
        assert r.index is None and r.after == r.before

    run(go())


def test_gate_refuses_gated_candidates_from_the_gate_on() -> None:
    async def go() -> None:
        s = InProcessStore()
        keys = [BudgetKey("k", 100, 80)]
        await s.budget_reserve(keys, [Candidate(79)], now=0, expires_at=10)
        assert (await s.budget_reserve(keys, [Candidate(1, gated=True)], now=0, expires_at=10)).index == 0
        assert (await s.budget_reserve(keys, [Candidate(1, gated=True), Candidate(2)], now=0, expires_at=10)).index == 1

    run(go())


def test_forced_candidate_counts_overruns_per_key() -> None:
    async def go() -> None:
        s = InProcessStore()
        keys = [BudgetKey("a", 100, 80), BudgetKey("b", 1000, 800)]
        r = await s.budget_reserve(keys, [Candidate(150, force=True)], now=0, expires_at=10)
        assert r.index == 0 and r.overrun
        assert r.after == (Counters(0, 150, 1), Counters(0, 150, 0))

    run(go())


def test_settle_release_and_expiry() -> None:
    async def go() -> None:
        s = InProcessStore(prune_every_s=0.0)
        keys = [BudgetKey("w1", 1000, 800)]
        await s.budget_reserve(keys, [Candidate(300)], now=0, expires_at=10)
        await s.budget_settle(["w1"], 300, 250, now=1, expires_at=10)
        await s.budget_reserve(keys, [Candidate(100)], now=2, expires_at=10)
        await s.budget_release(["w1"], 100, now=3)
        assert await s.budget_read(["w1", "nope"], now=4) == (Counters(250, 0, 0), Counters())
        assert await s.budget_read(["w1"], now=10) == (Counters(),)  # expired
        await s.budget_reserve([BudgetKey("w2", 10, 8)], [Candidate(1)], now=11, expires_at=20)
        assert "w1" not in s._budgets  # pruned

    run(go())


def test_blobs_counters_maps() -> None:
    async def go() -> None:
        s = InProcessStore()
        assert await s.get("x") is None
        await s.set("x", b"1")
        assert await s.get("x") == b"1"
        assert [await s.incr("seq") for _ in range(3)] == [1, 2, 3]
        await s.map_put("m", "a", b"A")
        assert await s.map_get_all("m") == {"a": b"A"}
        assert await s.map_delete("m", "a") and not await s.map_delete("m", "a")

    run(go())
