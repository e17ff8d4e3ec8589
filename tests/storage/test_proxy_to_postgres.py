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
            limits = httpx.Limits(max_connections=50)
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
