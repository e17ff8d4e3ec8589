"""Fixtures for the storage tests: a fresh PostgreSQL database per test module.

The server is the real one on 127.0.0.1:5432 (override with THERMOSTAT_TEST_PG_DSN).
Under CI=true an unreachable server fails the run instead of skipping it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

# THERMOSTAT_TEST_PG_DSN, when set, is the only candidate; else the local server as postgres, then as root.
CANDIDATE_DSNS = (
    [os.environ["THERMOSTAT_TEST_PG_DSN"]]
    if os.environ.get("THERMOSTAT_TEST_PG_DSN")
    else ["postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test"]
)


async def _first_reachable() -> tuple[str | None, str]:
    errors = []
    for dsn in CANDIDATE_DSNS:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception as exc:  # noqa: BLE001 - report every attempt
            errors.append(f"{dsn}: {type(exc).__name__}: {exc}")
            continue
        await conn.close()
        return dsn, ""
    return None, "; ".join(errors)


def _with_database(dsn: str, database: str, query: str = "") -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}{query}"


async def _create(base_dsn: str) -> tuple[str, str, str]:
    """A fresh database (or, without CREATEDB, a fresh schema in the base database)."""
    name = f"thermostat_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(base_dsn, timeout=5)
    try:
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return "database", name, _with_database(base_dsn, name)
        except asyncpg.InsufficientPrivilegeError:
            await conn.execute(f'CREATE SCHEMA "{name}"')
            database = base_dsn.rpartition("/")[2].split("?")[0]
            return "schema", name, _with_database(base_dsn, database, f"?search_path={name}")
    finally:
        await conn.close()


async def _drop(base_dsn: str, kind: str, name: str) -> None:
    conn = await asyncpg.connect(base_dsn, timeout=5)
    try:
        if kind == "database":
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def _run(coro_fn, *args):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion in its own thread (fixtures may be set up inside a running loop)."""
    result: list = []

    def target() -> None:
        result.append(asyncio.run(coro_fn(*args)))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError(f"{coro_fn.__name__} failed (see the thread's traceback above)")
    return result[0]


@pytest.fixture(scope="session")
def pg_base_dsn() -> str:
    dsn, errors = _run(_first_reachable)
    if dsn is None:
        message = f"PostgreSQL not reachable ({errors})"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return dsn


@pytest.fixture(scope="module")
def pg_dsn(pg_base_dsn: str) -> Iterator[str]:
    """DSN of a database (or schema) created for this test module and dropped after it."""
    kind, name, dsn = _run(_create, pg_base_dsn)
    yield dsn
    _run(_drop, pg_base_dsn, kind, name)
