"""`thermostat serve --workers 2`: one port, two processes, shared state, aggregated metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import free_port, wait_ready


def _sum(metrics: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M))


def test_two_workers_share_one_port_and_report_every_request(upstream: FakeUpstream, redis_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[server]
data_dir = "{tmp_path / 'data'}"
[[upstreams]]
name = "fake"
base_url = "{upstream.url}"
[storage]
redis_url = "redis://127.0.0.1:6379/0"
redis_key_prefix = "{redis_prefix}"
flush_interval_s = 0.05
[optimization]
mode = "general"
[admin]
allow_unauthenticated = true
"""
    )
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
