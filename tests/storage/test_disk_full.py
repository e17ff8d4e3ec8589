"""A full SQLite disk shows in `last_error` and readiness, and clears once writes succeed again (issue 21, item 10).

The disk is made full the way SQLite sees it, with `PRAGMA max_page_count` at the file's
current size: every later write fails with SQLITE_FULL ("database or disk is full"), the
error a full volume gives. It used to leave `last_error` null (ROLLBACK raised first,
SQLite had already rolled back) and readiness at 200 while answers waited unlogged.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

USER = [{"role": "user", "content": "alpha " * 300}]


def _ask(t: RunningThermostat, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = httpx.post(f"{t.url}/chat/completions", json={"model": "echo-1", "messages": USER}, timeout=10)
        assert r.status_code == 200  # answers never wait for the log
        ids.append(r.headers["x-request-id"])
    return ids


def _until(predicate, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_full_disk_is_reported_then_recovers(upstream: FakeUpstream, tmp_path: Path) -> None:
    running = start_thermostat(make_config(upstream.url, tmp_path))
    try:
        answered = _ask(running, 3)
        running.flush()
        conn = running.runtime.sink._conn  # type: ignore[attr-defined]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")
        answered += _ask(running, 30)

        def not_ready() -> bool:
            return httpx.get(f"{running.base}/health/readiness", timeout=10).status_code == 503

        _until(not_ready)
        ready = httpx.get(f"{running.base}/health/readiness", timeout=10).json()
        assert ready["checks"]["log_writes"] is False and "full" in ready["last_error"]
        db = httpx.get(f"{running.base}/api/optimization/db-status", timeout=10).json()
        assert "database or disk is full" in db["last_error"]
        health = httpx.get(f"{running.base}/api/optimization/health", timeout=10)
        assert health.status_code == 503

        conn.execute("PRAGMA max_page_count=1073741823")  # space freed

        def ready_again() -> bool:
            return httpx.get(f"{running.base}/health/readiness", timeout=10).status_code == 200

        _until(ready_again)
        assert httpx.get(f"{running.base}/api/optimization/db-status", timeout=10).json()["last_error"] is None
        running.flush()
        logged = {r["request_id"] for r in running.call(running.runtime.sink.query("SELECT request_id FROM logged_decisions"))}
        assert set(answered) <= logged  # nothing answered was lost while the disk was full
    finally:
        running.stop()
