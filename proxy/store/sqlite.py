"""Embedded decision log: SQLite under the data dir, so Thermostat works with no database.

Same records and the same `LogStore` semantics as the PostgreSQL log (one row per
request, feedback in its own table joined by request id, audit log, rollout
events). sqlite3 blocks, so every call runs in a worker thread, one at a time,
never on the event loop. Timestamps are REAL unix seconds, JSON columns are text.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from policies.validators import MAX_REASON_CHARS
from proxy.store.base import (
    AuditRecord,
    DecisionRow,
    EventRecord,
    StoreRecord,
    StoreStatus,
    decode_json,
    log_propensity,
    split_records,
    to_decision_row,
)
from proxy.store.entries import LogEntry

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
    timestamp REAL NOT NULL,
    validator_reason TEXT,  -- after the others, so a file from before sql/0005 gets it in the same place with ALTER TABLE
    cost_usd REAL  -- last, likewise for sql/0006
);
CREATE INDEX IF NOT EXISTS logged_decisions_ts ON logged_decisions (timestamp);
CREATE INDEX IF NOT EXISTS logged_decisions_task_ts ON logged_decisions (task_type, timestamp);
CREATE INDEX IF NOT EXISTS logged_decisions_mode_ts ON logged_decisions (mode, timestamp);
CREATE TABLE IF NOT EXISTS decision_feedback (
    request_id TEXT PRIMARY KEY,
    quality REAL NOT NULL,
    reward REAL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT 'explicit'
);
CREATE INDEX IF NOT EXISTS decision_feedback_received ON decision_feedback (received_at);
CREATE TABLE IF NOT EXISTS audit_log (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
CREATE TABLE IF NOT EXISTS rollout_events (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    from_phase TEXT,
    to_phase TEXT,
    reason TEXT NOT NULL,
    actor TEXT,
    evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_events_time ON rollout_events (time);
"""

_enc = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _enc.encode(value).decode()


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
        log_propensity(d.propensity),
        log_propensity(d.policy_propensity),
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
        None if o.validator_reason is None else o.validator_reason[:MAX_REASON_CHARS],
        o.cost_usd,
    )


_DECISION_COLUMNS = 30
_ROWS_PER_STATEMENT = 256  # 256 x 30 = 7,680 parameters, under SQLite's 32,766


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _insert_decisions(rows: int) -> str:
    """One multi-row INSERT for `rows` rows.

    sqlite3 releases the GIL around every statement step; with `executemany` that is
    once per row, and under load each re-acquisition waits for the event loop's
    switch interval (a convoy: the writer fell behind at ~3k rows/s while it manages
    30k alone). One statement per 256 rows needs one hand-off per 256 rows.
    """
    one = "(" + ",".join("?" * _DECISION_COLUMNS) + ")"
    return "INSERT OR IGNORE INTO logged_decisions VALUES " + ",".join([one] * rows)
_UPSERT_FEEDBACK = (
    "INSERT INTO decision_feedback (request_id, quality, reward, payload, received_at, source) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT(request_id) DO UPDATE SET "
    "quality=excluded.quality, reward=excluded.reward, payload=excluded.payload, received_at=excluded.received_at, source=excluded.source"
)
_INSERT_AUDIT = "INSERT OR IGNORE INTO audit_log VALUES (?,?,?,?,?,?,?)"
_INSERT_EVENT = "INSERT OR IGNORE INTO rollout_events VALUES (?,?,?,?,?,?,?,?)"

_SELECT_DECISIONS = """
SELECT d.*, f.quality AS feedback_quality, f.reward AS feedback_reward, f.source AS feedback_source
FROM logged_decisions d LEFT JOIN decision_feedback f ON f.request_id = d.request_id
"""


def _where(since: float | None, until: float | None, task_type: str | None, mode: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("d.timestamp >= ?")
        params.append(since)
    if until is not None:
        clauses.append("d.timestamp < ?")
        params.append(until)
    if task_type is not None:
        clauses.append("d.task_type = ?")
        params.append(task_type)
    if mode is not None:
        clauses.append("d.mode = ?")
        params.append(mode)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class SqliteSink:
    """The embedded `LogStore` (the name is kept from the first version)."""

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._rows_written = 0
        self._last_error: str | None = None
        self.last_prune_batches = 0

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")  # several worker processes may share the file
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(decision_feedback)")}
        if "source" not in columns:  # a file created before sql/0004_feedback_source.sql
            conn.execute("ALTER TABLE decision_feedback ADD COLUMN source TEXT NOT NULL DEFAULT 'explicit'")
        if "validator_reason" not in {row[1] for row in conn.execute("PRAGMA table_info(logged_decisions)")}:
            conn.execute("ALTER TABLE logged_decisions ADD COLUMN validator_reason TEXT")  # before sql/0005_validator_reason.sql
        if "cost_usd" not in {row[1] for row in conn.execute("PRAGMA table_info(logged_decisions)")}:
            conn.execute("ALTER TABLE logged_decisions ADD COLUMN cost_usd REAL")  # before sql/0006_cost_usd.sql
        self._conn = conn

    # --- writes ------------------------------------------------------------------------

    async def write(self, entries: Sequence[StoreRecord]) -> None:
        await asyncio.to_thread(self._write, list(entries))

    def _write(self, entries: list[StoreRecord]) -> None:
        log_entries, fb, audits, events = split_records(entries)
        decisions: list[tuple[Any, ...]] = []
        for start in range(0, len(log_entries), 64):
            decisions.extend(decision_row(e) for e in log_entries[start : start + 64])
            time.sleep(0)  # hand the GIL back to the event loop between chunks: no multi-ms stall per batch
        feedback = [(e.request_id, e.quality, e.reward, _json(e.payload), e.received_at, e.source) for e in fb]
        audit_rows = [
            (a.id, a.at, a.actor, a.action, a.target,
             None if a.before is None else _json(a.before), None if a.after is None else _json(a.after))
            for a in audits
        ]
        event_rows = [
            (e.id, e.at, e.kind, e.from_phase, e.to_phase, e.reason, e.actor, _json(e.evidence)) for e in events
        ]
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN")
            try:
                if decisions:
                    for start in range(0, len(decisions), _ROWS_PER_STATEMENT):
                        chunk = decisions[start : start + _ROWS_PER_STATEMENT]
                        conn.execute(_insert_decisions(len(chunk)), [value for row in chunk for value in row])
                if feedback:
                    conn.executemany(_UPSERT_FEEDBACK, feedback)
                if audit_rows:
                    conn.executemany(_INSERT_AUDIT, audit_rows)
                if event_rows:
                    conn.executemany(_INSERT_EVENT, event_rows)
                conn.execute("COMMIT")
            except BaseException as exc:
                # Recorded first: on a full disk SQLite has already rolled back, and ROLLBACK itself raises.
                self._last_error = f"{type(exc).__name__}: {exc}"
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._last_error = None
            self._rows_written += len(entries)

    async def append_audit(self, record: AuditRecord) -> None:
        await self.write([record])

    async def append_event(self, record: EventRecord) -> None:
        await self.write([record])

    # --- reads -------------------------------------------------------------------------

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Raw read helper (rows as dicts); prefer the typed reads below."""
        return await asyncio.to_thread(self._query, sql, tuple(params))

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._require().execute(sql, params)
            cols = [c[0] for c in cur.description or ()]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    async def fetch_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DecisionRow]:
        where, params = _where(since, until, task_type, mode)
        sql = _SELECT_DECISIONS + where + " ORDER BY d.timestamp DESC, d.request_id DESC LIMIT ? OFFSET ?"
        rows = await self.query(sql, [*params, int(limit), int(offset)])
        return [to_decision_row(r) for r in rows]

    async def get_decision(self, request_id: str) -> DecisionRow | None:
        rows = await self.query(_SELECT_DECISIONS + " WHERE d.request_id = ?", [request_id])
        return to_decision_row(rows[0]) if rows else None

    async def count_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
    ) -> int:
        where, params = _where(since, until, task_type, mode)
        rows = await self.query("SELECT COUNT(*) AS n FROM logged_decisions d" + where, params)
        return int(rows[0]["n"])

    async def fetch_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        rows = await self.query(
            "SELECT id, at, actor, action, target, before, after FROM audit_log ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
            [int(limit), int(offset)],
        )
        out = []
        for r in rows:
            r["before"] = decode_json(r["before"]) if r["before"] is not None else None
            r["after"] = decode_json(r["after"]) if r["after"] is not None else None
            out.append(msgspec.convert(r, AuditRecord))
        return out

    async def get_audit(self, audit_id: str) -> AuditRecord | None:
        rows = await self.query("SELECT id, at, actor, action, target, before, after FROM audit_log WHERE id = ?", [audit_id])
        if not rows:
            return None
        r = rows[0]
        r["before"] = decode_json(r["before"]) if r["before"] is not None else None
        r["after"] = decode_json(r["after"]) if r["after"] is not None else None
        return msgspec.convert(r, AuditRecord)

    async def count_audit(self) -> int:
        return int((await self.query("SELECT COUNT(*) AS n FROM audit_log"))[0]["n"])

    async def fetch_events(self, limit: int = 100, since: float | None = None) -> list[EventRecord]:
        where, params = ("", []) if since is None else (" WHERE time >= ?", [since])
        rows = await self.query(
            "SELECT id, time AS at, kind, from_phase, to_phase, reason, actor, evidence FROM rollout_events"
            + where + " ORDER BY time DESC, id DESC LIMIT ?",
            [*params, int(limit)],
        )
        for r in rows:
            r["evidence"] = decode_json(r["evidence"])
        return [msgspec.convert(r, EventRecord) for r in rows]

    # --- maintenance -------------------------------------------------------------------

    async def prune(self, older_than_s: float, batch_size: int = 5000) -> int:
        """Delete decisions and feedback older than `older_than_s`, `batch_size` rows per transaction."""
        cutoff = time.time() - older_than_s
        total = 0
        batches = 0
        for table, column, key in (
            ("logged_decisions", "timestamp", "request_id"),
            ("decision_feedback", "received_at", "request_id"),
        ):
            sql = f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {column} < ? LIMIT ?)"
            while True:
                n = await asyncio.to_thread(self._execute_count, sql, (cutoff, int(batch_size)))
                if n:
                    batches += 1
                total += n if table == "logged_decisions" else 0
                if n < batch_size:
                    break
                await asyncio.sleep(0)  # let other work run between batches
        self.last_prune_batches = batches
        return total

    def _execute_count(self, sql: str, params: tuple[Any, ...]) -> int:
        with self._lock:
            cur = self._require().execute(sql, params)
            return cur.rowcount

    def status(self) -> StoreStatus:
        return StoreStatus(kind="sqlite", connected=self._conn is not None, last_error=self._last_error,
                           rows_written=self._rows_written)

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


SqliteLogStore = SqliteSink
