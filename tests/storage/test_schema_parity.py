"""The SQLite decision log and the PostgreSQL migrations describe the same tables, column for column.

PostgreSQL gets its schema from `sql/NNNN_*.sql` (applied by `migrate`), SQLite from
`proxy.store.sqlite.SCHEMA` (run by `SqliteSink.open`). Both are read back from the real
databases here and compared: tables, column names, the storage class each column maps
to, NOT NULL, and the secondary indexes. A migration that adds, drops or changes a
column without the SQLite store (or the other way round) fails this test.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxy.store import SqliteSink, migrate

pytestmark = pytest.mark.postgres

# PostgreSQL type -> SQLite storage class the store keeps it as (UUIDs and JSON as text,
# timestamps as epoch seconds).
AFFINITY = {
    "uuid": "TEXT",
    "character varying": "TEXT",
    "text": "TEXT",
    "jsonb": "TEXT",
    "bigint": "INTEGER",
    "integer": "INTEGER",
    "double precision": "REAL",
    "timestamp with time zone": "REAL",
    "boolean": "INTEGER",
}

# The one deliberate difference: the deployment guide's surrogate key. SQLite keys a
# decision by request_id (PRIMARY KEY there, UNIQUE in PostgreSQL), so it needs none.
POSTGRES_ONLY = {("logged_decisions", "id")}
BOOKKEEPING = {"schema_migrations"}  # the migration runner's own table

Columns = dict[str, dict[str, tuple[str, bool]]]  # table -> column -> (storage class, not null)
Indexes = dict[str, set[tuple[str, ...]]]  # table -> column lists of its secondary (non-unique) indexes


async def _postgres_schema(dsn: str) -> tuple[Columns, Indexes]:
    conn = await asyncpg.connect(dsn)
    try:
        columns: Columns = {}
        for r in await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ):
            if r["table_name"] in BOOKKEEPING or (r["table_name"], r["column_name"]) in POSTGRES_ONLY:
                continue
            columns.setdefault(r["table_name"], {})[r["column_name"]] = (AFFINITY[r["data_type"]], r["is_nullable"] == "NO")
        indexes: Indexes = {}
        for r in await conn.fetch(
            """
            SELECT t.relname AS table_name, array_agg(a.attname ORDER BY k.n) AS cols
            FROM pg_index ix
            JOIN pg_class t ON t.oid = ix.indrelid
            JOIN pg_namespace ns ON ns.oid = t.relnamespace
            JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n) ON true
            JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
            WHERE ns.nspname = current_schema() AND NOT ix.indisprimary AND NOT ix.indisunique
            GROUP BY t.relname, ix.indexrelid
            """
        ):
            if r["table_name"] not in BOOKKEEPING:
                indexes.setdefault(r["table_name"], set()).add(tuple(r["cols"]))
        return columns, indexes
    finally:
        await conn.close()


async def _sqlite_schema(path: Path) -> tuple[Columns, Indexes]:
    sink = SqliteSink(path)
    await sink.open()
    await sink.close()
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        columns: Columns = {}
        indexes: Indexes = {}
        for table in tables:
            # PRAGMA table_info: (cid, name, type, notnull, default, pk); a primary key is never NULL
            columns[table] = {name: (decl.upper(), bool(notnull or pk)) for _, name, decl, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})")}
            for _, index, unique, origin, _ in conn.execute(f"PRAGMA index_list({table})"):
                if origin == "c" and not unique:
                    cols = tuple(r[2] for r in sorted(conn.execute(f"PRAGMA index_info({index})")))
                    indexes.setdefault(table, set()).add(cols)
        return columns, indexes
    finally:
        conn.close()


async def test_sqlite_store_matches_the_migrations_column_for_column(pg_dsn: str, tmp_path: Path) -> None:
    await migrate(pg_dsn)
    pg_columns, pg_indexes = await _postgres_schema(pg_dsn)
    lite_columns, lite_indexes = await _sqlite_schema(tmp_path / "log.sqlite")

    assert sorted(pg_columns) == sorted(lite_columns) == ["audit_log", "decision_feedback", "logged_decisions", "rollout_events"]
    for table in pg_columns:
        assert lite_columns[table] == pg_columns[table], table
    assert lite_indexes == pg_indexes
    assert len(pg_columns["logged_decisions"]) == 30  # the positional INSERT in proxy/store/sqlite.py binds 30 values
