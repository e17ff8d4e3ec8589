"""Embedded decision log: SQLite under the data dir, so Thermostat works with no database.

Same records as the PostgreSQL log (one row per request, feedback in its own table
joined by request id). sqlite3 blocks, so every call runs in a worker thread, one
at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from proxy.records import Entry, FeedbackEntry, LogEntry

SCHEMA = """
CREATE TABLE IF NOT EXISTS logged_decisions (
    request_id TEXT PRIMARY KEY,
    task_type TEXT NOT NULL,
    model_name TEXT NOT NULL,
    upstream TEXT NOT NULL,
    context_fingerprint INTEGER NOT NULL,
    context_features TEXT NOT NULL,
    chosen_params TEXT NOT NULL,
    baseline_params TEXT NOT NULL,
    policy_params TEXT,
    log_propensity REAL NOT NULL,
    policy_log_propensity REAL,
    arm_index INTEGER,
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    mode TEXT NOT NULL,
    guard_notes TEXT NOT NULL,
    status INTEGER NOT NULL,
    error_class TEXT,
    latency_s REAL NOT NULL,
    ttft_s REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    quality REAL,
    reward REAL,
    outcome TEXT NOT NULL,
    prompt TEXT,
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logged_decisions_ts ON logged_decisions (timestamp);
CREATE INDEX IF NOT EXISTS logged_decisions_task_ts ON logged_decisions (task_type, timestamp);
CREATE TABLE IF NOT EXISTS decision_feedback (
    request_id TEXT PRIMARY KEY,
    quality REAL NOT NULL,
    reward REAL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""

_enc = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _enc.encode(value).decode()


def _log(p: float | None) -> float | None:
    if p is None:
        return None
    return math.log(p) if p > 0 else float("-inf")


def decision_row(entry: LogEntry) -> tuple[Any, ...]:
    d, o = entry.decision, entry.outcome
    ctx = d.context
    return (
        d.request_id,
        ctx.task_type,
        ctx.model,
        ctx.upstream,
        d.context_fingerprint,
        _json(entry.context_features),
        _json(d.sent),
        _json(d.baseline),
        _json(d.policy_choice) if d.policy_choice is not None else None,
        _log(d.propensity),
        _log(d.policy_propensity),
        d.arm_index,
        d.policy,
        d.policy_version,
        d.mode,
        _json(d.guard_notes),
        o.status,
        o.error_class,
        o.latency_s,
        o.ttft_s,
        o.prompt_tokens,
        o.completion_tokens,
        o.finish_reason,
        o.quality,
        o.reward,
        _json(o),
        entry.prompt,
        d.created_at,
    )


_INSERT_DECISION = (
    "INSERT OR IGNORE INTO logged_decisions VALUES (" + ",".join("?" * 28) + ")"
)
_UPSERT_FEEDBACK = (
    "INSERT INTO decision_feedback VALUES (?,?,?,?,?) ON CONFLICT(request_id) DO UPDATE SET "
    "quality=excluded.quality, reward=excluded.reward, payload=excluded.payload, received_at=excluded.received_at"
)


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def write(self, entries: Sequence[Entry]) -> None:
        await asyncio.to_thread(self._write, list(entries))

    def _write(self, entries: list[Entry]) -> None:
        decisions = [decision_row(e) for e in entries if isinstance(e, LogEntry)]
        feedback = [
            (e.request_id, e.quality, e.reward, _json(e.payload), e.received_at)
            for e in entries
            if isinstance(e, FeedbackEntry)
        ]
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN")
            try:
                if decisions:
                    conn.executemany(_INSERT_DECISION, decisions)
                if feedback:
                    conn.executemany(_UPSERT_FEEDBACK, feedback)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read helper for the control API and OPE (rows as dicts)."""
        return await asyncio.to_thread(self._query, sql, tuple(params))

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._require().execute(sql, params)
            cols = [c[0] for c in cur.description or ()]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("sqlite sink is not open")
        return self._conn

    async def close(self) -> None:
        def _close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(_close)
