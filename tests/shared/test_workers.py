"""`thermostat serve --workers 2`: one port, two processes, shared state, aggregated metrics."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from proxy.workers import usable_cores
from tests.shared.conftest import REDIS_URL
from tests.shared.test_replicas_inprocess import wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import free_port, wait_ready


def _sum(metrics: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M))


def write_config(tmp_path: Path, upstream: FakeUpstream, redis_prefix: str, *, storage: str = "", extra: str = "") -> Path:
    """A config on Redis with no `workers` key (the flag or "auto" decides)."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[server]
data_dir = "{tmp_path / 'data'}"
[[upstreams]]
name = "fake"
base_url = "{upstream.url}"
models = ["*"]
[storage]
redis_url = "{REDIS_URL}"
redis_key_prefix = "{redis_prefix}"
flush_interval_s = 0.05
{storage}
[optimization]
mode = "general"
[admin]
allow_unauthenticated = true
{extra}"""
    )
    return config


def test_two_workers_share_one_port_and_report_every_request(upstream: FakeUpstream, redis_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, upstream, redis_prefix)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/health/readiness", proc)
        n = 60
        for i in range(n):
            # a fresh connection each time so both workers get traffic
            r = httpx.post(f"{base}/v1/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": f"q{i}"}]},
                           headers={"connection": "close"}, timeout=10)
            assert r.status_code == 200
        locks = sorted(p.name for p in (tmp_path / "data" / "workers").glob("worker-*.lock"))
        assert locks == ["worker-0.lock", "worker-1.lock"]
        # whichever worker answers the scrape, it reports both workers' requests
        for _ in range(4):
            text = httpx.get(f"{base}/metrics", headers={"connection": "close"}, timeout=10).text
            assert _sum(text, "thermostat_requests_total") == n
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    # both workers flushed their decisions into the one embedded log
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "decisions.sqlite3")
    assert db.execute("SELECT count(*) FROM logged_decisions").fetchone()[0] == n


def test_workers_without_redis_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n')
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--workers", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "storage.redis_url" in proc.stderr


# Usage per request (fake upstream): prompt 59 + completion min(41 words, max_tokens) = 89 tokens.
MESSAGES = [{"role": "user", "content": " ".join(["word"] * 40)}]
LIMIT = 3_000


def _requests_by_pid(metrics_dir: Path) -> dict[int, float]:
    """`thermostat_requests_total` per worker process, from each process's own multiprocess file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
            if metric.name == "thermostat_requests":
                counts[pid] = sum(s.value for s in metric.samples if s.name == "thermostat_requests_total")
    return counts


async def _burst(url: str, n: int) -> list[httpx.Response]:
    """`n` chat requests at once, each on a connection of its own (so the kernel spreads them over the workers)."""
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        body = {"model": "echo-1", "messages": MESSAGES, "max_tokens": 30, "temperature": 0.5}
        return list(await asyncio.gather(*(client.post(f"{url}/chat/completions", json=body) for _ in range(n))))


@pytest.mark.timeout(180)
def test_auto_runs_a_worker_per_core_and_the_budget_holds_across_them(
    redis_prefix: str, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    """The default (`workers = "auto"`, no flag) with Redis: one worker per core on one port, every
    worker serving, one budget for all of them checked against the upstream's own token count,
    and the workers gone with their supervisor even when it is killed with -9."""
    cores = usable_cores()
    if cores < 2:
        pytest.skip("one usable core: auto runs a single worker")
    upstream = FakeUpstream().start()  # of its own, so its token count is this test's
    port = free_port()
    config = write_config(tmp_path, upstream, redis_prefix, storage="sync_interval_s = 0.25", extra=f"""
[caws]
budget_limit = {LIMIT}
on_exhausted = "reject"
store_timeout_s = 1.0
lease_horizon_s = 0.3
lease_ttl_s = 0.5
lease_refill_s = 0.05
""")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
                            stdout=log, stderr=log, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/health/readiness", proc, timeout=90)
        heartbeats = lambda: len(list(sync_redis.scan_iter(match=f"{redis_prefix}replica:*")))  # noqa: E731
        wait_for(lambda: heartbeats() == cores, 60, step=0.2)  # every worker is up and syncing
        assert f"with {cores} worker processes" in (tmp_path / "serve.log").read_text()

        served = 0
        responses: list[httpx.Response] = []
        for _ in range(6):  # 6 x 15 requests of 89 tokens: 8,010 asked of a 3,000 cap
            burst = asyncio.run(_burst(f"{base}/v1", 15))
            responses += burst
            served += sum(r.json()["usage"]["total_tokens"] for r in burst if r.status_code == 200)
            time.sleep(0.5)
        assert {r.status_code for r in responses} <= {200, 429, 503}, sorted({r.status_code for r in responses})
        assert upstream.billed_tokens == served <= LIMIT, (upstream.billed_tokens, served)
        assert served >= LIMIT - 10 * 89 * cores, served  # spent, not stranded in idle leases

        by_pid = _requests_by_pid(metrics_dir)
        workers = {pid for pid, n in by_pid.items() if n > 0}
        assert len(workers) == cores, by_pid  # every worker served some of them
        assert sum(by_pid.values()) == sum(r.status_code == 200 for r in responses)  # (refusals are not outcomes)

        os.kill(proc.pid, signal.SIGKILL)  # the supervisor only: the kernel tells its workers (SIGTERM)
        proc.wait(10)
        wait_for(lambda: not any(_alive(pid) for pid in workers), 40, step=0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        log.close()
        upstream.stop()
    # the workers stopped cleanly: every token counted, every lease handed back
    key = next(iter(sync_redis.scan_iter(match=f"{redis_prefix}caws:*:all")))
    used, reserved = (int(v or 0) for v in sync_redis.hmget(key, "used", "reserved"))
    assert (used, reserved) == (served, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
