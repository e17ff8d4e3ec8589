"""The real `thermostat serve` process: start, serve, SIGTERM, nothing recorded is lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import free_port, wait_ready


def test_sigterm_finishes_inflight_and_flushes_log(upstream: FakeUpstream, tmp_path: Path) -> None:
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
flush_interval_s = 30
[optimization]
mode = "general"
[admin]
allow_unauthenticated = true
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/health/readiness", proc)
        ids = []
        for _ in range(20):
            r = httpx.post(f"{base}/v1/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            ids.append(r.headers["x-request-id"])
        # a slow request in flight when SIGTERM arrives still completes
        with httpx.Client(timeout=10) as client:
            import threading

            result: dict[str, int] = {}

            def slow() -> None:
                result["status"] = client.post(f"{base}/v1/chat/completions", json={"model": "slow-500", "messages": [{"role": "user", "content": "x"}]}).status_code

            t = threading.Thread(target=slow)
            t.start()
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            t.join(10)
        assert result.get("status") == 200
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # flush_interval_s = 30: the rows can only be there because shutdown flushed them
    db = sqlite3.connect(tmp_path / "data" / "decisions.sqlite3")
    got = {row[0] for row in db.execute("SELECT request_id FROM logged_decisions")}
    assert set(ids) <= got and len(got) == 21


def test_retention_prunes_old_decisions(upstream: FakeUpstream, tmp_path: Path) -> None:
    from tests.conftest import make_config
    from tests.support.servers import start_thermostat

    cfg = make_config(upstream.url, tmp_path, storage={"flush_interval_s": 0.05, "retention_days": 30})
    running = start_thermostat(cfg)
    try:
        for _ in range(3):
            httpx.post(f"{running.url}/chat/completions", json={"model": "echo-1", "messages": [{"role": "user", "content": "x"}]})
        running.flush()
        sink = running.runtime.sink
        running.call(sink.query("UPDATE logged_decisions SET timestamp = timestamp - 31 * 86400 WHERE rowid IN (SELECT rowid FROM logged_decisions LIMIT 2)"))
        assert running.call(running.runtime.pruner.prune_expired()) == 2
        assert running.call(sink.count_decisions()) == 1
    finally:
        running.stop()
