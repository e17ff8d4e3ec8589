"""Migrations against the real PostgreSQL: concurrent, repeated, and via the CLI."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.cli import main
from proxy.store import migrate
from proxy.store.migrations import load_migrations

pytestmark = pytest.mark.postgres

ALL = [name for _, name, _ in load_migrations()]


def test_migration_files_are_numbered_in_order() -> None:
    assert ALL[:6] == [
        "0001_decision_log.sql", "0002_control_tables.sql", "0003_drop_unused_tables.sql", "0004_feedback_source.sql", "0005_validator_reason.sql",
        "0006_cost_usd.sql",
    ]
    assert ALL == sorted(ALL)


async def test_concurrent_then_repeated_migrations(pg_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(pg_dsn) for _ in range(6)))
    applied = [name for r in results for name in r]
    assert sorted(applied) == sorted(ALL)  # each migration applied exactly once across the replicas
    assert await migrate(pg_dsn) == []
    assert await migrate(pg_dsn) == []

    conn = await asyncpg.connect(pg_dsn)
    try:
        tables = {r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        assert {"logged_decisions", "decision_feedback", "rollout_events", "audit_log", "schema_migrations"} <= tables
        assert not {"optimization_results", "slo_metrics", "waivers"} & tables  # never written or read: 0003 drops them
        versions = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
        assert versions == ALL
        indexes = {r["indexname"] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'logged_decisions' AND schemaname = current_schema()")}
        assert {"logged_decisions_request_id_key", "logged_decisions_timestamp_idx",
                "logged_decisions_task_timestamp_idx"} <= indexes
    finally:
        await conn.close()


def test_cli_migrate_is_idempotent(pg_dsn: str, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndatabase_url = "{pg_dsn}"\n[server]\ndata_dir = "{tmp_path}"\n')
    assert main(["migrate", "--config", str(cfg)]) == 0
    assert main(["migrate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "none pending" in out
