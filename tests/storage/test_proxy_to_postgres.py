"""Through the real proxy into real PostgreSQL: one logged decision per request, none lost."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from proxy.config import build_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat


def test_2000_requests_at_concurrency_50_each_logged_once(upstream: FakeUpstream, pg_dsn: str, tmp_path) -> None:
    cfg = build_config(
        {
            "server": {"data_dir": str(tmp_path)},
            "upstreams": [{"name": "fake", "base_url": upstream.url}],
            "storage": {"database_url": pg_dsn, "flush_interval_s": 0.1, "batch_size": 200},
            "optimization": {"mode": "canary", "seed": 4},
            "admin": {"allow_unauthenticated": True},
        },
        environ={},
    )
    running = start_thermostat(cfg)
    ids: list[str] = []
    statuses: list[int] = []
    try:
        async def drive() -> None:
            # The client must drop an idle connection before the server does (uvicorn closes one idle for
            # 5 s, httpx's default expiry is also 5 s): with equal timeouts a request can be sent on a
            # connection the server is closing, which is a ReadError that says nothing about Thermostat.
            limits = httpx.Limits(max_connections=50, keepalive_expiry=2.0)
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:
                sem = asyncio.Semaphore(50)

                async def one(i: int) -> None:
                    async with sem:
                        r = await client.post(
                            f"{running.url}/chat/completions",
                            json={"model": "echo-1", "messages": [{"role": "user", "content": f"req {i}"}], "user": f"u{i % 97}"},
                        )
                        statuses.append(r.status_code)
                        ids.append(r.headers["x-request-id"])

                await asyncio.gather(*(one(i) for i in range(2000)))

        asyncio.run(drive())
        running.flush(settle_s=0.3)
    finally:
        running.stop()  # shutdown flushes whatever is left

    assert statuses.count(200) == 2000

    async def count() -> tuple[int, int, int, int]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT request_id) AS d,"
                " count(*) FILTER (WHERE status = 200 AND latency_s > 0) AS ok,"
                " count(*) FILTER (WHERE mode = 'optimized') AS opt FROM logged_decisions"
            )
            return row["n"], row["d"], row["ok"], row["opt"]
        finally:
            await conn.close()

    n, distinct, ok, optimized = asyncio.run(count())
    assert (n, distinct, ok) == (2000, 2000, 2000)
    # canary: 5 % of users (97 stable keys) are optimised, the rest are holdout
    assert 0 < optimized < 2000


def test_control_audit_round_trip_and_count_on_postgres(upstream: FakeUpstream, pg_dsn: str, tmp_path, monkeypatch) -> None:
    """/security-status counts audit rows on PostgreSQL too, and the audit_log check reads its own entry back."""
    monkeypatch.setenv("THERMOSTAT_PG_CONTROL_TOKEN", "pg-control-token-0123456789")
    cfg = build_config(
        {
            "server": {"data_dir": str(tmp_path)},
            "upstreams": [{"name": "fake", "base_url": upstream.url}],
            "storage": {"database_url": pg_dsn, "flush_interval_s": 0.1},
            "admin": {"token_env": "THERMOSTAT_PG_CONTROL_TOKEN"},
        },
        environ={},
    )
    running = start_thermostat(cfg)
    api = f"{running.base}/api/optimization"
    auth = {"authorization": "Bearer pg-control-token-0123456789"}
    try:
        before = httpx.get(f"{api}/security-status", headers=auth, timeout=30).json()["audit_entries"]
        assert isinstance(before, int)
        assert httpx.post(f"{api}/rollback", json={"reason": "pg audit"}, headers=auth, timeout=30).status_code == 200
        checks = {c["name"]: c for c in httpx.get(f"{api}/compliance-status", headers=auth, timeout=30).json()["checks"]}
        assert checks["audit_log"]["ok"] is True and checks["audit_log"]["detail"].startswith("log store postgres")
        after = httpx.get(f"{api}/security-status", headers=auth, timeout=30).json()["audit_entries"]
    finally:
        running.stop()

    async def count() -> int:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM audit_log"))
        finally:
            await conn.close()

    assert after == before + 2 == asyncio.run(count())  # the rollback and the compliance check's own entry
