"""Three Thermostat runtimes (each with its own policy, budget guard and Redis connections)
behind real HTTP servers, sharing one Redis: budget, posterior, rollback, feedback lookup."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from guards.state import Counters
from proxy.learning.sync import digest, from_hash
from tests.conftest import make_config
from tests.shared.conftest import REDIS_URL
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "sort this list please"}]
LIMIT = 3_000


def replica_config(upstream: FakeUpstream, data_dir: Path, prefix: str, seed: int, **extra: Any) -> Any:
    sections: dict[str, Any] = {
        "optimization": {"mode": "general", "policy": "thompson_gaussian", "seed": seed},
        "storage": {"flush_interval_s": 0.05, "redis_url": REDIS_URL, "redis_key_prefix": prefix, "sync_interval_s": 0.25},
        "caws": {"budget_limit": LIMIT, "on_exhausted": "reject", "store_timeout_s": 5.0},  # room for a loaded machine: this test is not about timeouts
        "policy": {"half_life_s": 0},  # undiscounted: exact merged totals are compared across replicas
    }
    sections.update(extra)
    return make_config(upstream.url, data_dir, **sections)


async def drive(urls: list[str], n: int, concurrency: int = 30) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(i: int) -> httpx.Response:
            async with sem:
                body = {"model": "echo-1", "messages": MESSAGES, "max_tokens": 150, "temperature": 0.5}
                return await client.post(f"{urls[i % len(urls)]}/chat/completions", json=body, headers={"x-task-type": "code"})

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def snapshot_digest(t: RunningThermostat) -> str:
    async def go() -> str:
        return digest(t.runtime.policy.snapshot())

    return t.call(go())


def wait_for(predicate: Any, timeout: float, step: float = 0.02) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


@pytest.fixture
def replicas(upstream: FakeUpstream, tmp_path: Path, redis_prefix: str) -> Any:
    running = [start_thermostat(replica_config(upstream, tmp_path / f"r{i}", redis_prefix, seed=i)) for i in range(3)]
    yield running
    for t in running:
        t.stop()


async def test_three_replicas_share_budget_posterior_rollback_and_decisions(
    replicas: list[RunningThermostat], sync_redis: redis.Redis, redis_prefix: str
) -> None:
    responses = await drive([t.url for t in replicas], 450)
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 429) for s in statuses), sorted(set(statuses))
    assert statuses.count(200) > 50 and statuses.count(429) > 0  # the shared budget ran out
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in responses if r.status_code == 429)

    # the budget, counted in Redis across the three replicas, never went past the limit
    window = replicas[0].runtime.budget.window_start(time.time())
    key = f"caws:{window}:all"
    store = replicas[0].runtime.state_store

    def counters() -> Counters:
        return replicas[0].call(store.budget_read([key], now=time.time()))[0]

    wait_for(lambda: counters().reserved == 0, 30)
    c = counters()
    assert 0 < c.used <= LIMIT and c.overruns == 0

    # all three converge to the same posterior, which is the merged one in Redis
    policy_hash = replicas[0].runtime.shared.policy_key  # type: ignore[union-attr]

    def converged() -> bool:
        merged = digest(from_hash(sync_redis.hgetall(policy_hash)))
        return all(snapshot_digest(t) == merged for t in replicas)

    wait_for(converged, 30, step=0.1)
    merged = from_hash(sync_redis.hgetall(policy_hash))
    learned = sum(v[0] for v in merged.values())
    assert learned == statuses.count(200)  # every served request counted once, on some replica

    # feedback may reach any replica: a decision made on replica 0 is found from replica 2
    rid = next(r.headers["x-request-id"] for i, r in enumerate(responses) if r.status_code == 200 and i % 3 == 0)
    found = replicas[2].call(replicas[2].runtime.shared.find_decision(rid))  # type: ignore[union-attr]
    assert found is not None
    decision, outcome = found
    assert decision.request_id == rid and outcome is not None and outcome.status == 200
    assert replicas[2].runtime.registry.get(rid, time.time()) is None  # not local: it came from Redis
    assert replicas[2].call(replicas[2].runtime.shared.find_decision("nope")) is None  # type: ignore[union-attr]

    # a rollback posted to replica 0 holds on the others within 1 s
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.post(f"{replicas[0].base}/api/optimization/rollback", json={"reason": "test"})
    assert r.status_code == 200, r.text
    elapsed = wait_for(lambda: all(t.runtime.rollout.state.rollback.active for t in replicas[1:]), 1.0, step=0.005)
    assert elapsed < 1.0
    # ...and the others now send baseline parameters
    follow = await drive([replicas[1].url, replicas[2].url], 4)
    assert all(x.headers.get("x-thermostat-mode") == "rollback" for x in follow if x.status_code == 200)


def test_a_restarted_replica_starts_from_the_merged_posterior(upstream: FakeUpstream, tmp_path: Path, redis_prefix: str) -> None:
    first = start_thermostat(replica_config(upstream, tmp_path / "a", redis_prefix, seed=1, caws={"budget_limit": 1_000_000}))
    try:
        responses = asyncio.run(drive([first.url], 40))
        assert all(r.status_code == 200 for r in responses)
        wait_for(lambda: first.runtime.shared.pending() == 0 and sum(v[0] for v in first.runtime.policy.snapshot().values()) == 40, 30)  # type: ignore[union-attr]
    finally:
        first.stop()
    again = start_thermostat(replica_config(upstream, tmp_path / "b", redis_prefix, seed=2, caws={"budget_limit": 1_000_000}))
    try:
        assert sum(v[0] for v in again.runtime.policy.snapshot().values()) == 40  # loaded before serving
    finally:
        again.stop()
