"""Three `thermostat serve` processes on different ports sharing one Redis, driven concurrently.

The strongest form of the replica test: separate interpreters, nothing shared but Redis.
Each replica's posterior is compared through its heartbeat (`<prefix>replica:<id>`: digest
of `policy.snapshot()` after its last sync), against the merged totals in Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from proxy.learning.sync import digest, from_hash
from tests.shared.conftest import REDIS_URL
from tests.shared.test_replicas_inprocess import drive, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import free_port

LIMIT = 3_000


def write_config(path: Path, upstream: FakeUpstream, prefix: str, seed: int) -> None:
    path.write_text(
        f"""
[server]
data_dir = "{path.parent / f"data{seed}"}"

[[upstreams]]
name = "fake"
base_url = "{upstream.url}"
models = ["*"]
timeout_s = 5.0

[storage]
redis_url = "{REDIS_URL}"
redis_key_prefix = "{prefix}"
flush_interval_s = 0.05

[optimization]
mode = "general"
policy = "thompson_gaussian"
seed = {seed}

# undiscounted: the test compares exact merged totals across processes
[policy]
half_life_s = 0

[caws]
budget_limit = {LIMIT}
on_exhausted = "reject"
# room for a loaded machine (a 503 when a Redis answer takes longer): this test is not about timeouts
store_timeout_s = 5.0

[admin]
allow_unauthenticated = true
"""
    )


@pytest.fixture
def processes(upstream: FakeUpstream, tmp_path: Path, redis_prefix: str) -> list[str]:
    exe = Path(sys.executable).with_name("thermostat")
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    for i in range(3):
        cfg = tmp_path / f"r{i}.toml"
        write_config(cfg, upstream, redis_prefix, seed=i)
        port = free_port()
        log = open(tmp_path / f"r{i}.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [str(exe), "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log, stderr=log, env=env
            )
        )
        bases.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60  # a liveness guard, not a timing claim: a loaded machine took 12 s to import and bind
        for base, proc in zip(bases, procs):
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"replica exited: {(tmp_path / 'r0.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    pytest.fail("replica did not start")
                time.sleep(0.05)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_three_processes_share_budget_posterior_and_rollback(processes: list[str], sync_redis: redis.Redis, redis_prefix: str) -> None:
    responses = asyncio.run(drive([f"{b}/v1" for b in processes], 450))
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 429) for s in statuses), sorted(set(statuses))
    assert statuses.count(429) > 0 and statuses.count(200) > 30

    # budget: one counter in Redis for all three; never past the limit, no overrun
    budget_keys = [k for k in sync_redis.scan_iter(match=f"{redis_prefix}caws:*:all")]
    assert len(budget_keys) == 1

    def budget() -> dict[bytes, bytes]:
        return sync_redis.hgetall(budget_keys[0])

    wait_for(lambda: int(budget()[b"reserved"]) == 0, 30)
    assert 0 < int(budget()[b"used"]) <= LIMIT and int(budget().get(b"overruns", 0)) == 0
    assert 0 < sync_redis.pttl(budget_keys[0]) <= 2 * 86_400_000  # the window key expires with the window

    # posterior: every replica's heartbeat digest equals the merged totals' digest
    policy_key = f"{redis_prefix}policy:thompson_gaussian:1"

    def heartbeats() -> list[dict]:
        return [json.loads(sync_redis.get(k)) for k in sync_redis.scan_iter(match=f"{redis_prefix}replica:*")]

    def converged() -> bool:
        merged = from_hash(sync_redis.hgetall(policy_key))
        beats = heartbeats()
        return (
            len(beats) == 3
            and sum(v[0] for v in merged.values()) == statuses.count(200)
            and all(b["digest"] == digest(merged) for b in beats)
        )

    wait_for(converged, 6, step=0.1)

    # a rollback posted to one replica is in force on the other two within 1 s
    r = httpx.post(f"{processes[0]}/api/optimization/rollback", json={"reason": "process test"}, timeout=5)
    assert r.status_code == 200, r.text
    posted = time.monotonic()

    def rolled_back(base: str) -> bool:
        return bool(httpx.get(f"{base}/api/optimization/rollback-status", timeout=1).json().get("active"))

    pending = set(processes[1:])
    while pending and time.monotonic() - posted < 1.0:
        pending = {b for b in pending if not rolled_back(b)}
    assert not pending, f"not rolled back within 1 s: {pending}"
