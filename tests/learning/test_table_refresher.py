"""The policy-table refresher belongs to policies that can defer their rebuilds, and only to them."""

from __future__ import annotations

import asyncio

from policies.registry import make_policy
from policies.settings import LinUCBSettings, ThompsonSettings
from proxy.learning import TableRefresher


class Stale:
    """Three slices' worth of stale tables, then none."""

    def __init__(self) -> None:
        self.deferred_refresh = False
        self.left = 5
        self.calls: list[int] = []
        self.drained = asyncio.Event()

    def refresh_stale(self, limit: int = 64) -> int:
        self.calls.append(limit)
        done = min(limit, self.left)
        self.left -= done
        if self.left == 0:
            self.drained.set()
        return done


def test_only_refreshable_policies_get_a_refresher() -> None:
    thompson = make_policy("thompson_gaussian", thompson=ThompsonSettings(), linucb=LinUCBSettings())
    linucb = make_policy("linucb", thompson=ThompsonSettings(), linucb=LinUCBSettings())
    assert TableRefresher.for_policy(thompson) is not None
    assert TableRefresher.for_policy(linucb) is None


def test_started_refresher_defers_rebuilds_and_drains_in_slices_of_two() -> None:
    policy = Stale()

    async def scenario() -> None:
        refresher = TableRefresher(policy, interval_s=0.001)
        refresher.start()
        assert policy.deferred_refresh
        await asyncio.wait_for(policy.drained.wait(), 10)
        await refresher.stop()

    asyncio.run(scenario())
    assert policy.calls[:3] == [2, 2, 2] and policy.left == 0
