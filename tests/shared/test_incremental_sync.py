"""Replica sync reads only what changed since its last read, and its Redis keys expire."""

from __future__ import annotations

from pathlib import Path

import redis

from policies.records import Arm, RequestContext
from proxy.learning import SharedState
from proxy.learning.sync import digest, from_hash
from proxy.runtime import Runtime
from tests.conftest import make_config
from tests.shared.conftest import REDIS_URL
from tests.support.fake_upstream import FakeUpstream

BASE = Arm(0.7, 512)
TTL_S = 3600.0


def _ctx(task: str) -> RequestContext:
    return RequestContext(task, "m", "chat", 100, 1, False, False, False, 0.7, 512)


def _runtime(upstream: FakeUpstream, data_dir: Path, prefix: str) -> Runtime:
    cfg = make_config(
        upstream.url,
        data_dir,
        optimization={"mode": "general", "policy": "thompson_gaussian", "seed": 1},
        policy={"half_life_s": 0},  # undiscounted: digests of the merged totals are compared exactly
        storage={"redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 3600.0, "state_ttl_s": TTL_S},
    )
    return Runtime(cfg)


def _shared(rt: Runtime) -> SharedState:
    assert rt.shared is not None
    return rt.shared


async def test_sync_reads_only_changed_keys(upstream: FakeUpstream, tmp_path: Path, redis_prefix: str, sync_redis: redis.Redis) -> None:
    a, b = _runtime(upstream, tmp_path / "a", redis_prefix), _runtime(upstream, tmp_path / "b", redis_prefix)
    await a.start()
    await b.start()
    try:
        sa, sb = _shared(a), _shared(b)
        for i in range(50):
            a.policy.update(_ctx(f"task-{i}"), BASE, BASE, 0.5)
        await sa.sync_once()
        assert sa.changed_keys_read == 50  # its own push, read back as the merged totals
        await sb.sync_once()
        assert sb.changed_keys_read == 50
        assert digest(a.policy.snapshot()) == digest(b.policy.snapshot())

        # idle: nothing changed, nothing read, whatever the size of the state
        version = sa.status()["state_version"]
        for _ in range(3):
            await sa.sync_once()
            await sb.sync_once()
            assert (sa.changed_keys_read, sb.changed_keys_read) == (0, 0)
        assert sa.status()["state_version"] == version

        # one bucket changes on b: each replica reads that one key
        b.policy.update(_ctx("task-7"), BASE, BASE, 1.0)
        await sb.sync_once()
        await sa.sync_once()
        assert (sa.changed_keys_read, sb.changed_keys_read) == (1, 1)
        assert a.policy.posterior(_ctx("task-7"), BASE).n == 2
        merged = from_hash(sync_redis.hgetall(sa.policy_key))
        assert digest(a.policy.snapshot()) == digest(b.policy.snapshot()) == digest(merged)

        # every key of the shared statistics expires unless a replica keeps syncing
        for key in (sa.policy_key, sa.costs_key, *sa.change_keys, sa.version_key):
            if sync_redis.exists(key):
                assert 0 < sync_redis.pttl(key) <= TTL_S * 1000, key
        assert sync_redis.exists(sa.policy_key, sa.change_keys[0], sa.version_key) == 3

        # Redis lost the state (flush, expiry) and the version counted up again past where a
        # stopped reading: the new epoch makes a read everything, not just the recent changes
        since_a = sa.status()["state_version"]
        sync_redis.delete(sa.policy_key, sa.costs_key, *sa.change_keys, sa.version_key)
        for _ in range(since_a + 1):
            b.policy.update(_ctx("task-1"), BASE, BASE, 0.0)
            await sb.sync_once()
        assert sb.status()["state_version"] > since_a
        await sa.sync_once()
        merged = from_hash(sync_redis.hgetall(sa.policy_key))
        assert len(merged) == 1
        assert digest(a.policy.snapshot()) == digest(merged)
    finally:
        await a.stop()
        await b.stop()
