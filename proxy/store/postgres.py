"""PostgreSQL decision log (asyncpg): the counterfactual log off-policy evaluation reads.

`PostgresLogStore.open()` creates a small connection pool and applies pending
migrations (under the advisory lock, so replicas starting together are safe).
`write(batch)` runs in one transaction with `executemany` (asyncpg pipelines the
rows in one round trip): decisions `ON CONFLICT (request_id) DO NOTHING`, feedback
upserted, audit and rollout events `ON CONFLICT (id) DO NOTHING`, so a batch
written twice never duplicates. This class does not spool: wrap it in
`proxy.store.spool.SpoolingStore` (as `make_log_store` does) so an unreachable
database never blocks the recorder or loses a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from policies.validators import MAX_REASON_CHARS
from proxy.store.base import (
    AuditRecord,
    DecisionRow,
    EventRecord,
    StoreRecord,
    StoreStatus,
    log_propensity,
    split_records,
    to_decision_row,
)
from proxy.store.entries import FeedbackEntry, LogEntry
from proxy.store.migrations import migrate_connection

log = logging.getLogger("thermostat.store.postgres")

_enc = msgspec.json.Encoder()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _json_text(value: Any) -> str:
    return _enc.encode(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog", format="text")
    await conn.set_type_codec("json", encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog", format="text")


def _ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, tz=UTC)


def _cut(value: str | None, n: int) -> str | None:
    return value if value is None or len(value) <= n else value[:n]


def _int64(value: int) -> int:
    """Fit any integer into BIGINT (two's complement wrap), so a fingerprint never poisons a batch."""
    if _INT64_MIN <= value <= _INT64_MAX:
        return value
    value &= (1 << 64) - 1
    return value - (1 << 64) if value > _INT64_MAX else value


def _valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(str(value))
        return True
    except (ValueError, TypeError, AttributeError):
        return False


DECISION_COLUMNS = (
    "request_id", "task_type", "model_name", "upstream", "context_fingerprint", "context_features",
    "chosen_params", "baseline_params", "policy_params", "log_propensity", "policy_log_propensity",
    "arm_index", "policy", "policy_version", "mode", "guard_notes", "status", "error_class", "latency_s",
    "ttft_s", "prompt_tokens", "completion_tokens", "finish_reason", "quality", "reward", "outcome",
    "prompt", "timestamp", "validator_reason", "cost_usd",
)

_INSERT_DECISION = (
    f"INSERT INTO logged_decisions ({', '.join(DECISION_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(DECISION_COLUMNS) + 1))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)
_UPSERT_FEEDBACK = (
    "INSERT INTO decision_feedback (request_id, quality, reward, payload, received_at, source) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (request_id) DO UPDATE SET quality = EXCLUDED.quality, reward = EXCLUDED.reward, "
    "payload = EXCLUDED.payload, received_at = EXCLUDED.received_at, source = EXCLUDED.source"
)
_INSERT_AUDIT = (
    "INSERT INTO audit_log (id, at, actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "ON CONFLICT (id) DO NOTHING"
)
_INSERT_EVENT = (
    "INSERT INTO rollout_events (id, time, kind, from_phase, to_phase, reason, actor, evidence) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
)
_SELECT_DECISIONS = (
    "SELECT " + ", ".join(f"d.{c}" for c in DECISION_COLUMNS)
    + ", f.quality AS feedback_quality, f.reward AS feedback_reward, f.source AS feedback_source "
    "FROM logged_decisions d LEFT JOIN decision_feedback f ON f.request_id = d.request_id"
)


def _decision_args(entry: LogEntry) -> tuple[Any, ...]:
    d, o = entry.decision, entry.outcome
    ctx = d.context
    return (
        d.request_id,
        _cut(ctx.task_type, 255),
        _cut(ctx.model, 255),
        _cut(ctx.upstream, 255),
        _int64(d.context_fingerprint),
        entry.context_features,
        d.sent,
        d.baseline,
        d.policy_choice,
        log_propensity(d.propensity),
        log_propensity(d.policy_propensity),
        d.arm_index,
        _cut(d.policy, 64),
        _cut(d.policy_version, 50),
        _cut(d.mode, 32),
        list(d.guard_notes),
        o.status,
        _cut(o.error_class, 64),
        o.latency_s,
        o.ttft_s,
        o.prompt_tokens,
        o.completion_tokens,
        _cut(o.finish_reason, 64),
        o.quality,
        o.reward,
        o,
        None if entry.prompt is None else entry.prompt.replace("\x00", "\ufffd"),  # PostgreSQL text refuses NUL
        _ts(d.created_at),
        _cut(o.validator_reason, MAX_REASON_CHARS),
        o.cost_usd,
    )


def _feedback_args(e: FeedbackEntry) -> tuple[Any, ...]:
    return (e.request_id, e.quality, e.reward, e.payload, _ts(e.received_at), e.source)


def _where(since: float | None, until: float | None, task_type: str | None, mode: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for value, clause in (
        (None if since is None else _ts(since), "d.timestamp >= ${}"),
        (None if until is None else _ts(until), "d.timestamp < ${}"),
        (task_type, "d.task_type = ${}"),
        (mode, "d.mode = ${}"),
    ):
        if value is not None:
            params.append(value)
            clauses.append(clause.format(len(params)))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _row(record: asyncpg.Record) -> DecisionRow:
    doc = dict(record)
    doc["request_id"] = str(doc["request_id"])
    doc["timestamp"] = doc["timestamp"].timestamp()
    return to_decision_row(doc)


def is_connection_error(exc: BaseException) -> bool:
    """Errors that mean "the database is not there right now" (retry later), not "this batch is bad"."""
    return isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            asyncio.TimeoutError,
            asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError, pool closed
            asyncpg.PostgresConnectionError,  # class 08
            asyncpg.CannotConnectNowError,  # 57P03
            asyncpg.OperatorInterventionError,  # 57P01 admin shutdown / pg_terminate_backend
            asyncpg.InsufficientResourcesError,  # 53xxx incl. too many connections
            asyncpg.ReadOnlySQLTransactionError,  # failover onto a standby
            ConnectionError,
        ),
    )


def is_poison_error(exc: BaseException) -> bool:
    """Errors that will recur on every retry of the same batch (bad data), so it must be set aside."""
    return isinstance(
        exc,
        (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, TypeError, ValueError, msgspec.EncodeError),
    ) and not is_connection_error(exc)


class PostgresLogStore:
    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 3.0,
        command_timeout_s: float = 10.0,
        migrate_on_open: bool = True,
        application_name: str = "thermostat",
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.migrate_on_open = migrate_on_open
        self.application_name = application_name
        self._pool: asyncpg.Pool | None = None
        self._open_lock = asyncio.Lock()
        self.connected = False
        self.last_error: str | None = None
        self.rows_written = 0
        self.rejected = 0  # records refused before reaching the database (e.g. a non-UUID request id)
        self.last_prune_batches = 0

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and apply pending migrations; raises if the database is unreachable."""
        async with self._open_lock:
            if self._pool is not None:
                return
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                init=_init_connection,
                server_settings={"application_name": self.application_name},
            )
            try:
                if self.migrate_on_open:
                    async with pool.acquire() as conn:
                        applied = await migrate_connection(conn)
                    if applied:
                        log.info("applied %d migration(s): %s", len(applied), ", ".join(applied))
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
            self.connected = True
            self.last_error = None

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self.connected = False
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5.0)
            except Exception:  # noqa: BLE001 - a failed graceful close falls back to terminate
                pool.terminate()

    def _require(self) -> asyncpg.Pool:
        if self._pool is None:
            raise asyncpg.InterfaceError("postgres store is not open")
        return self._pool

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        if is_connection_error(exc):
            self.connected = False

    # --- writes ------------------------------------------------------------------------

    async def write(self, entries: Sequence[StoreRecord]) -> None:
        decisions, feedback, audits, events = split_records(entries)
        bad = [e.decision.request_id for e in decisions if not _valid_uuid(e.decision.request_id)]
        bad += [e.request_id for e in feedback if not _valid_uuid(e.request_id)]
        if bad:
            self.rejected += len(bad)
            log.warning("dropping %d record(s) whose request id is not a UUID (e.g. %r)", len(bad), bad[0][:64])
            decisions = [e for e in decisions if _valid_uuid(e.decision.request_id)]
            feedback = [e for e in feedback if _valid_uuid(e.request_id)]
        pool = self._require()
        try:
            async with pool.acquire() as conn, conn.transaction():
                if decisions:
                    await conn.executemany(_INSERT_DECISION, [_decision_args(e) for e in decisions])
                if feedback:
                    await conn.executemany(_UPSERT_FEEDBACK, [_feedback_args(e) for e in feedback])
                if audits:
                    await conn.executemany(_INSERT_AUDIT, [
                        (a.id, _ts(a.at), _cut(a.actor, 255), _cut(a.action, 64), _cut(a.target, 255), a.before, a.after)
                        for a in audits
                    ])
                if events:
                    await conn.executemany(_INSERT_EVENT, [
                        (e.id, _ts(e.at), _cut(e.kind, 32), _cut(e.from_phase, 32), _cut(e.to_phase, 32), e.reason,
                         _cut(e.actor, 255), e.evidence)
                        for e in events
                    ])
        except BaseException as exc:
            self._failed(exc)
            raise
        self.connected = True
        self.rows_written += len(decisions) + len(feedback) + len(audits) + len(events)

    async def append_audit(self, record: AuditRecord) -> None:
        await self.write([record])

    async def append_event(self, record: EventRecord) -> None:
        await self.write([record])

    # --- reads -------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            rows = await self._require().fetch(sql, *args)
        except BaseException as exc:
            self._failed(exc)
            raise
        self.connected = True
        return rows

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
        n = len(params)
        sql = f"{_SELECT_DECISIONS}{where} ORDER BY d.timestamp DESC, d.request_id DESC LIMIT ${n + 1} OFFSET ${n + 2}"
        return [_row(r) for r in await self._fetch(sql, *params, int(limit), int(offset))]

    async def get_decision(self, request_id: str) -> DecisionRow | None:
        if not _valid_uuid(request_id):
            return None
        rows = await self._fetch(f"{_SELECT_DECISIONS} WHERE d.request_id = $1", request_id)
        return _row(rows[0]) if rows else None

    async def count_decisions(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        mode: str | None = None,
    ) -> int:
        where, params = _where(since, until, task_type, mode)
        rows = await self._fetch(f"SELECT COUNT(*) AS n FROM logged_decisions d{where}", *params)
        return int(rows[0]["n"])

    async def fetch_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        rows = await self._fetch(
            "SELECT id, at, actor, action, target, before, after FROM audit_log ORDER BY at DESC, id DESC LIMIT $1 OFFSET $2",
            int(limit), int(offset),
        )
        return [
            AuditRecord(id=str(r["id"]), at=r["at"].timestamp(), actor=r["actor"], action=r["action"], target=r["target"],
                        before=r["before"], after=r["after"])
            for r in rows
        ]

    async def get_audit(self, audit_id: str) -> AuditRecord | None:
        if not _valid_uuid(audit_id):
            return None
        rows = await self._fetch("SELECT id, at, actor, action, target, before, after FROM audit_log WHERE id = $1", audit_id)
        if not rows:
            return None
        r = rows[0]
        return AuditRecord(id=str(r["id"]), at=r["at"].timestamp(), actor=r["actor"], action=r["action"], target=r["target"],
                           before=r["before"], after=r["after"])

    async def count_audit(self) -> int:
        return int((await self._fetch("SELECT COUNT(*) AS n FROM audit_log"))[0]["n"])

    async def fetch_events(self, limit: int = 100, since: float | None = None) -> list[EventRecord]:
        cols = "SELECT id, time, kind, from_phase, to_phase, reason, actor, evidence FROM rollout_events"
        if since is None:
            rows = await self._fetch(f"{cols} ORDER BY time DESC, id DESC LIMIT $1", int(limit))
        else:
            rows = await self._fetch(f"{cols} WHERE time >= $1 ORDER BY time DESC, id DESC LIMIT $2", _ts(since), int(limit))
        return [
            EventRecord(id=str(r["id"]), at=r["time"].timestamp(), kind=r["kind"], from_phase=r["from_phase"],
                        to_phase=r["to_phase"], reason=r["reason"], actor=r["actor"], evidence=r["evidence"] or {})
            for r in rows
        ]

    # --- maintenance -------------------------------------------------------------------

    async def prune(self, older_than_s: float, batch_size: int = 5000) -> int:
        """Delete decisions (and feedback received) older than `older_than_s`; one short transaction per batch.

        Returns the number of decisions deleted.
        """
        cutoff = _ts(time.time() - older_than_s)
        pool = self._require()
        total = 0
        batches = 0
        for table, column, key in (
            ("logged_decisions", "timestamp", "id"),
            ("decision_feedback", "received_at", "request_id"),
        ):
            sql = (
                f"DELETE FROM {table} WHERE {key} IN "
                f"(SELECT {key} FROM {table} WHERE {column} < $1 ORDER BY {column} LIMIT $2)"
            )
            while True:
                status = await pool.execute(sql, cutoff, int(batch_size))
                n = int(status.split()[-1])
                if n:
                    batches += 1
                if table == "logged_decisions":
                    total += n
                if n < batch_size:
                    break
                await asyncio.sleep(0)
        self.last_prune_batches = batches
        return total

    def status(self) -> StoreStatus:
        return StoreStatus(kind="postgres", connected=self.connected and self._pool is not None,
                           last_error=self.last_error, rows_written=self.rows_written)
