"""Numbered SQL migrations for the PostgreSQL decision log.

`migrate(dsn)` applies the pending `sql/NNNN_name.sql` files in order, each in its
own transaction together with its row in `schema_migrations`, while holding a
session-level `pg_advisory_lock`, so several replicas starting at once apply
every migration exactly once (the others wait, then find nothing pending).
Idempotent: a second run applies nothing and returns `[]`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("thermostat.migrations")

# Arbitrary constant: the advisory-lock key that serialises migrations on one database.
ADVISORY_LOCK_KEY = 0x7468_6572_6D6F  # "thermo"

_NAME = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
)
"""


def sql_dir() -> Path:
    """`sql/` in a source checkout, or `proxy/_sql` in an installed wheel."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "sql", here.parents[1] / "_sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("migration directory not found (looked for sql/ and proxy/_sql/)")


def load_migrations(directory: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) sorted by version; refuses duplicate numbers."""
    directory = directory or sql_dir()
    found: dict[int, tuple[int, str, str]] = {}
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if not m:
            continue
        version = int(m.group(1))
        if version in found:
            raise RuntimeError(f"two migrations numbered {version:04d}: {found[version][1]} and {path.name}")
        found[version] = (version, path.name, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()[:16]


async def migrate_connection(conn: Any, directory: Path | None = None) -> list[str]:
    """Apply pending migrations on an open asyncpg connection; returns the names applied."""
    migrations = load_migrations(directory)
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(_BOOTSTRAP)
        done = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        for version, name, sql in migrations:
            if version in done:
                if done[version]["checksum"] != _checksum(sql):
                    log.warning("migration %s changed since it was applied (checksum differs); not re-applied", name)
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version, name, _checksum(sql),
                )
            log.info("applied migration %s", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    return applied


async def migrate(dsn: str, *, directory: Path | None = None, timeout: float = 10.0) -> list[str]:
    """Connect to `dsn`, apply pending migrations under the advisory lock, return their names."""
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        return await migrate_connection(conn, directory)
    finally:
        await conn.close()
