"""Storage for the decision log: SQLite (embedded default) and PostgreSQL (behind a local spool).

`make_log_store(config)` picks one from `storage.database_url`; both implement
`proxy.store.base.LogStore`.
"""

from __future__ import annotations

from pathlib import Path

from proxy.config import Config
from proxy.store.base import (
    AuditRecord,
    DecisionRow,
    EventRecord,
    LogStore,
    Sink,
    StoreRecord,
    StoreStatus,
    StoreUnavailable,
)

__all__ = [
    "AuditRecord",
    "DecisionRow",
    "EventRecord",
    "LogStore",
    "Sink",
    "StoreRecord",
    "StoreStatus",
    "StoreUnavailable",
    "make_log_store",
    "parse_duration",
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
