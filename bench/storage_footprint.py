"""Bytes per logged decision in PostgreSQL and SQLite, measured through the real proxy.

Command: `.venv/bin/python bench/storage_footprint.py [--requests 5000]`
Writes bench/results/storage_footprint.md. Needs PostgreSQL on 127.0.0.1:5432 (database `test`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.config import build_config  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.servers import start_thermostat  # noqa: E402

BASE_DSN = os.environ.get("THERMOSTAT_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def drive(url: str, n: int) -> None:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32), timeout=30) as client:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                body = {"model": "echo-1", "messages": [{"role": "user", "content": f"please summarise document {i}"}], "temperature": 0.5, "max_tokens": 300}
                r = await client.post(f"{url}/chat/completions", json=body, headers={"x-task-type": "summarise"})
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(n)))


async def pg_size(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE logged_decisions")
        n = await conn.fetchval("SELECT count(*) FROM logged_decisions")
        size = await conn.fetchval("SELECT pg_total_relation_size('logged_decisions')")
        return int(n), int(size)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    name = f"thermostat_bench_{uuid.uuid4().hex[:8]}"
    base = BASE_DSN.rpartition("/")[0]

    async def create() -> None:
        conn = await asyncpg.connect(BASE_DSN)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(BASE_DSN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(create())
    upstream = FakeUpstream().start()
    rows = []
    try:
        for kind in ("postgresql", "sqlite"):
            with tempfile.TemporaryDirectory() as tmp:
                storage = {"database_url": f"{base}/{name}"} if kind == "postgresql" else {}
                cfg = build_config({"server": {"data_dir": tmp}, "upstreams": [{"name": "u", "base_url": upstream.url}],
                                    "storage": storage, "optimization": {"mode": "general"}}, environ={})
                running = start_thermostat(cfg)
                asyncio.run(drive(running.url, args.requests))
                running.flush(0.5)
                running.stop()
                if kind == "postgresql":
                    n, size = asyncio.run(pg_size(f"{base}/{name}"))
                else:
                    import sqlite3

                    path = Path(tmp) / "decisions.sqlite3"
                    db = sqlite3.connect(path)
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    n = db.execute("SELECT count(*) FROM logged_decisions").fetchone()[0]
                    db.close()
                    size = path.stat().st_size
                rows.append((kind, n, size, size / max(n, 1)))
    finally:
        upstream.stop()
        asyncio.run(drop())
    out = [
        "# Decision-log footprint",
        "",
        f"Command: `.venv/bin/python bench/storage_footprint.py --requests {args.requests}` ({time.strftime('%Y-%m-%d')}); prompts not stored.",
        "",
        "| store | decisions | bytes (table + indexes) | bytes per decision |",
        "| --- | ---: | ---: | ---: |",
    ]
    out += [f"| {k} | {n} | {size:,} | {per:,.0f} |" for k, n, size, per in rows]
    text = "\n".join(out) + "\n"
    Path(__file__).with_name("results").joinpath("storage_footprint.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
