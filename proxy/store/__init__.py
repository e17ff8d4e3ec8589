"""Storage: the decision log (SQLite, the embedded default, or PostgreSQL behind a local spool),
its journal and recorder, the Redis and local state stores, retention.

`make_log_store(config)` picks a log store from `storage.database_url`; both implement
`LogStore`. The PostgreSQL and SQLite classes and `migrate` load on first use (PEP 562):
asyncpg is imported only by a process that uses PostgreSQL.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.config import Config
from proxy.store.base import AuditRecord, DecisionRow, EventRecord, LogStore, Sink, StoreRecord, StoreStatus, StoreUnavailable, storable
from proxy.store.entries import FeedbackEntry, LogEntry
from proxy.store.journal import Journal
from proxy.store.local_state import LocalState
from proxy.store.recorder import Recorder
from proxy.store.redis_state import REDIS_UNAVAILABLE, RedisStore
from proxy.store.retention import RetentionPruner

if TYPE_CHECKING:
    from proxy.store.migrations import migrate
    from proxy.store.postgres import PostgresLogStore
    from proxy.store.sqlite import SqliteSink

_LAZY = {"migrate": "migrations", "PostgresLogStore": "postgres", "SqliteSink": "sqlite"}

__all__ = [
    "AuditRecord",
    "DecisionRow",
    "EventRecord",
    "FeedbackEntry",
    "Journal",
    "LocalState",
    "LogEntry",
    "LogStore",
    "PostgresLogStore",
    "REDIS_UNAVAILABLE",
    "Recorder",
    "RedisStore",
    "RetentionPruner",
    "Sink",
    "SqliteSink",
    "StoreRecord",
    "StoreStatus",
    "StoreUnavailable",
    "make_log_store",
    "migrate",
    "parse_duration",
    "storable",
]


def make_log_store(config: Config, spool_dir: Path | None = None) -> LogStore:
    """SQLite under `server.data_dir` when `storage.database_url` is empty, else PostgreSQL wrapped in the spool.

    Nothing connects here: `await store.open()` does (the recorder's `start()` calls it).
    """
    data_dir = Path(config.server.data_dir)
    st = config.storage
    if not st.database_url:
        from proxy.store.sqlite import SqliteSink

        return SqliteSink(data_dir / "decisions.sqlite3")
    from proxy.store.postgres import PostgresLogStore
    from proxy.store.spool import SpoolingStore

    inner = PostgresLogStore(st.database_url, max_size=st.pool_max_size, command_timeout_s=max(st.write_timeout_s * 2, 10.0))
    return SpoolingStore(
        inner,
        (spool_dir or data_dir / "spool") / "decisions.spool",
        write_timeout_s=st.write_timeout_s,
        shutdown_flush_s=st.shutdown_flush_s,
        fsync=st.spool_fsync,
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """`90d`, `12h`, `30m`, `45s`, `2w` or plain seconds -> seconds."""
    raw = text.strip().lower()
    if not raw:
        raise ValueError("empty duration")
    unit = raw[-1]
    try:
        if unit in _UNITS:
            value = float(raw[:-1]) * _UNITS[unit]
        else:
            value = float(raw)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 90d, 12h, 30m, 45s)") from None
    if value < 0:
        raise ValueError(f"{text!r}: duration must be >= 0")
    return value


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'proxy.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"proxy.store.{module}"), name)
