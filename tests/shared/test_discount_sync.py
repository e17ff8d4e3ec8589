"""Discounting across replicas through Redis: the store is decayed at the shared epoch boundary, so the
merged totals equal one process that saw every reward, decayed (merges stay additive); a reopen reaches
every replica."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from policies.base import Discount
from policies.records import Arm, RequestContext
from policies.registry import make_policy
from proxy.learning import SharedState
from proxy.learning.sync import from_hash
from proxy.runtime import Runtime
from tests.conftest import make_config
from tests.shared.conftest import REDIS_URL
from tests.support.fake_upstream import FakeUpstream

BASE = Arm(0.7, 512)
HALF_LIFE = 16 * 3600.0  # one epoch per hour, γ = 2^(-1/16)


def _ctx(task: str) -> RequestContext:
    return RequestContext(task, "m", "chat", 100, 1, False, False, False, 0.7, 512, "up")


def _runtime(upstream: FakeUpstream, data_dir: Path, prefix: str, policy: str) -> Runtime:
    cfg = make_config(
        upstream.url,
        data_dir,
        optimization={"mode": "general", "policy": policy, "seed": 1},
        storage={"redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 3600.0},
        policy={"half_life_s": HALF_LIFE},
    )
    return Runtime(cfg)


def _shared(rt: Runtime) -> SharedState:
    assert rt.shared is not None
    return rt.shared


@pytest.mark.parametrize("policy", ["thompson_gaussian", "linucb"])
async def test_replicas_decay_at_the_shared_boundary_and_merge_additively(
    upstream: FakeUpstream, tmp_path: Path, redis_prefix: str, sync_redis: redis.Redis, policy: str
) -> None:
    a, b = _runtime(upstream, tmp_path / "a", redis_prefix, policy), _runtime(upstream, tmp_path / "b", redis_prefix, policy)
    await a.start()
    await b.start()
    rng = np.random.default_rng(0)
    rewards = [(Arm(0.5 + 0.1 * int(rng.integers(4)), 512), float(rng.random())) for _ in range(30)]
    try:
        sa, sb = _shared(a), _shared(b)
        e0 = a.policy.decay_epoch  # type: ignore[attr-defined]
        assert b.policy.decay_epoch == e0  # type: ignore[attr-defined]

        def feed(rt: Runtime, part: list[tuple[Arm, float]]) -> None:
            for arm, r in part:
                rt.policy.update(_ctx("code"), BASE, arm, r)

        feed(a, rewards[:10])
        feed(b, rewards[10:20])
        await sa.sync_once()
        await sb.sync_once()
        # a crosses two boundaries first (b's clock lags): the store is decayed once, by γ², on a's push
        a.policy.advance(e0 + 2)  # type: ignore[attr-defined]
        feed(a, rewards[20:25])
        await sa.sync_once()
        feed(b, rewards[25:])  # made in e0 while the store is in e0 + 2: scaled by γ² when pushed
        await sb.sync_once()
        assert b.policy.decay_epoch == e0 + 2  # type: ignore[attr-defined]  # adopted the store's epoch
        await sa.sync_once()
        merged = from_hash(sync_redis.hgetall(sa.policy_key))
        gamma2 = Discount(HALF_LIFE).factor(2)
        # by hand: everything made in e0 weighs γ², a's 5 rewards made in e0 + 2 weigh 1
        snap_old = make_policy(policy)
        for i, (arm, r) in enumerate(rewards):
            if not 20 <= i < 25:
                snap_old.update(_ctx("code"), BASE, arm, r)
        snap_new = make_policy(policy)
        for arm, r in rewards[20:25]:
            snap_new.update(_ctx("code"), BASE, arm, r)
        old, new = snap_old.snapshot(), snap_new.snapshot()
        for key in old.keys() | new.keys():
            want = gamma2 * np.asarray(old.get(key, [0.0] * len(new.get(key, [])))) + np.asarray(new.get(key, [0.0] * len(old[key])))
            np.testing.assert_allclose(merged[key], want, rtol=1e-9, atol=1e-12)
            for rt in (a, b):
                np.testing.assert_allclose(rt.policy.snapshot()[key], want, rtol=1e-9, atol=1e-12)

        # a reopen on one replica reaches the other at the next sync
        a.policy.reopen("code")  # type: ignore[attr-defined]
        await sa.sync_once()
        await sb.sync_once()
        fresh = make_policy(policy)
        np.testing.assert_allclose(b.policy.propensities(_ctx("code"), BASE, [BASE, Arm(0.6, 512)]),
                                   fresh.propensities(_ctx("code"), BASE, [BASE, Arm(0.6, 512)]))  # fmt: skip
        assert b.policy.version.rpartition("-")[0].endswith("~r1")
    finally:
        await a.stop()
        await b.stop()
