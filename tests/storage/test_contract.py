"""One read/write contract, run against both LogStore implementations (SQLite and PostgreSQL+spool)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from policies.records import Params
from proxy.config import build_config
from proxy.store import AuditRecord, EventRecord, LogStore, SqliteSink, make_log_store
from proxy.store.spool import SpoolingStore
from tests.storage.factory import feedback, log_entry

DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LogStore]:
    storage: dict = {}
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        storage["database_url"] = dsn
        conn = await asyncpg.connect(dsn)
        try:  # a clean slate per test (the database is shared by the module)
            await conn.execute("DO $$ BEGIN IF to_regclass('logged_decisions') IS NOT NULL THEN "
                               "TRUNCATE logged_decisions, decision_feedback, audit_log, rollout_events; END IF; END $$")
        finally:
            await conn.close()
    cfg = build_config({"server": {"data_dir": str(tmp_path)}, "storage": storage}, environ={})
    s = make_log_store(cfg)
    assert isinstance(s, SpoolingStore if request.param == "postgres" else SqliteSink)
    assert isinstance(s, LogStore)
    await s.open()
    yield s
    await s.close()


async def test_round_trip_every_field(store: LogStore) -> None:
    entry = log_entry()
    rid = entry.decision.request_id
    await store.write([entry])
    row = await store.get_decision(rid)
    assert row is not None
    d, o = entry.decision, entry.outcome
    assert row.request_id == rid
    assert row.timestamp == pytest.approx(d.created_at, abs=1e-5)
    assert (row.task_type, row.model_name, row.upstream) == ("code", "gpt-x", "openai")
    assert row.context_fingerprint == d.context_fingerprint
    assert row.context_features == {"len_bucket": 2, "tools": True}
    assert row.chosen_params == Params(temperature=0.3, max_tokens=600)
    assert row.baseline_params == Params(temperature=0.7, max_tokens=800)
    assert row.policy_params == Params(temperature=0.2, max_tokens=500)
    assert row.log_propensity == pytest.approx(math.log(0.25))
    assert row.propensity == pytest.approx(0.25)
    assert row.policy_log_propensity == pytest.approx(math.log(0.5))
    assert (row.arm_index, row.policy, row.policy_version, row.mode) == (7, "thompson_gaussian", "ts-v3", "optimized")
    assert row.guard_notes == ("trust_region:clipped", "budget:ok")
    assert (row.status, row.error_class, row.latency_s, row.ttft_s) == (200, None, 1.25, 0.125)
    assert (row.prompt_tokens, row.completion_tokens, row.finish_reason) == (42, 300, "stop")
    assert (row.quality, row.reward) == (0.8, 0.65)
    assert msgspec.convert(row.outcome, type(o)) == o
    assert row.prompt == "write a sort function"
    assert row.feedback_quality is None and row.feedback_reward is None
    assert row.effective_quality == 0.8

    await store.write([feedback(rid, quality=0.3, reward=None)])
    row = await store.get_decision(rid)
    assert row is not None and (row.feedback_quality, row.feedback_reward) == (0.3, None)
    assert row.effective_quality == 0.3 and row.effective_reward == 0.65
    assert await store.get_decision(str(uuid.uuid4())) is None


async def test_optional_fields_null(store: LogStore) -> None:
    entry = log_entry(prompt=None)
    entry.decision.policy_choice = None
    entry.decision.policy_propensity = None
    entry.decision.arm_index = None
    entry.decision.guard_notes = ()
    entry.decision.propensity = 0.0
    entry.outcome = msgspec.structs.replace(entry.outcome, ttft_s=None, quality=None, status=502, error_class="upstream_error")
    await store.write([entry])
    row = await store.get_decision(entry.decision.request_id)
    assert row is not None
    assert row.policy_params is None and row.policy_log_propensity is None and row.arm_index is None
    assert row.guard_notes == () and row.prompt is None and row.ttft_s is None and row.quality is None
    assert row.log_propensity == float("-inf") and row.propensity == 0.0
    assert (row.status, row.error_class) == (502, "upstream_error")


async def test_idempotent_writes(store: LogStore) -> None:
    batch = [log_entry() for _ in range(20)]
    rid = batch[0].decision.request_id
    await store.write(batch)
    await store.write(batch)  # a replayed batch
    await store.write(batch[:5] + [log_entry(rid)])  # overlapping batch, same request id again
    assert await store.count_decisions() == 20
    # feedback: upsert, last one wins, also within one batch
    await store.write([feedback(rid, quality=0.1), feedback(rid, quality=0.2)])
    await store.write([feedback(rid, quality=0.4, reward=0.5)])
    row = await store.get_decision(rid)
    assert row is not None and (row.feedback_quality, row.feedback_reward) == (0.4, 0.5)
    assert await store.count_decisions() == 20


async def test_fetch_filters_order_and_paging(store: LogStore) -> None:
    now = time.time()
    entries = [
        log_entry(created_at=now - 100 + i, task_type="code" if i % 2 else "chat", mode="shadow" if i % 3 else "optimized")
        for i in range(30)
    ]
    await store.write(entries)
    rows = await store.fetch_decisions(limit=100)
    assert [r.request_id for r in rows] == [e.decision.request_id for e in reversed(entries)]  # newest first
    page2 = await store.fetch_decisions(limit=10, offset=10)
    assert [r.request_id for r in page2] == [e.decision.request_id for e in reversed(entries)][10:20]
    code = await store.fetch_decisions(task_type="code")
    assert len(code) == 15 and all(r.task_type == "code" for r in code)
    assert await store.count_decisions(task_type="code") == 15
    expected_shadow_code = sum(1 for i in range(30) if i % 2 and i % 3)
    assert await store.count_decisions(task_type="code", mode="shadow") == expected_shadow_code
    window = await store.fetch_decisions(since=now - 90, until=now - 80)
    assert [r.request_id for r in window] == [e.decision.request_id for e in reversed(entries[10:20])]
    assert await store.count_decisions(since=now - 90, until=now - 80) == 10
    assert await store.count_decisions() == 30


async def test_audit_and_events(store: LogStore) -> None:
    now = time.time()
    a1 = AuditRecord(at=now - 2, actor="alice", action="set_phase", target="rollout", before={"phase": "shadow"},
                     after={"phase": "canary"})
    a2 = AuditRecord(at=now - 1, actor="bob", action="waiver.create", target="WV-0001", after={"extra_tokens": 5000})
    await store.append_audit(a1)
    await store.append_audit(a2)
    await store.write([a1])  # replayed: no duplicate
    got = await store.fetch_audit(limit=10)
    assert [g.id for g in got] == [a2.id, a1.id]
    assert got[1].before == {"phase": "shadow"} and got[1].after == {"phase": "canary"} and got[0].before is None
    assert got[1].at == pytest.approx(a1.at, abs=1e-5) and got[1].actor == "alice"
    assert [g.id for g in await store.fetch_audit(limit=1, offset=1)] == [a1.id]

    e1 = EventRecord(at=now - 10, kind="rollback", from_phase="canary", to_phase="rollback", reason="p99 breach",
                     evidence={"p99_ms": 4100.0, "n": 250}, actor="slo")
    e2 = EventRecord(at=now - 5, kind="resume", from_phase="rollback", to_phase="shadow")
    await store.append_event(e1)
    await store.append_event(e2)
    await store.write([e2])
    events = await store.fetch_events(limit=10)
    assert [e.id for e in events] == [e2.id, e1.id]
    assert events[1].evidence == {"p99_ms": 4100.0, "n": 250} and events[1].reason == "p99 breach"
    assert events[1].actor == "slo" and events[0].actor is None
    assert [e.id for e in await store.fetch_events(since=now - 6)] == [e2.id]


async def test_audit_by_id_and_count(store: LogStore) -> None:
    """What /compliance-status (write, read back by id) and /security-status (count) need, the same on both stores."""
    assert await store.count_audit() == 0
    a = AuditRecord(at=time.time(), actor="token:abcd1234", action="compliance_check", target="audit_log", after={"ok": True})
    assert await store.get_audit(a.id) is None
    await store.append_audit(a)
    await store.write([a])  # replayed: still one
    got = await store.get_audit(a.id)
    assert got is not None and (got.id, got.actor, got.action, got.target, got.after) == (a.id, a.actor, a.action, a.target, {"ok": True})
    assert got.at == pytest.approx(a.at, abs=1e-5)
    assert await store.count_audit() == 1
    assert await store.get_audit("not-a-uuid") is None


async def test_prune_deletes_only_old_rows_in_batches(store: LogStore) -> None:
    now = time.time()
    old = [log_entry(created_at=now - 100 * DAY - i) for i in range(23)]
    new = [log_entry(created_at=now - 10 * DAY - i) for i in range(5)]
    await store.write(old + new)
    await store.write([feedback(e.decision.request_id, received_at=now - 100 * DAY) for e in old[:3]])
    await store.write([feedback(new[0].decision.request_id, received_at=now - DAY)])
    deleted = await store.prune(90 * DAY, batch_size=5)
    assert deleted == 23
    assert store.last_prune_batches >= 5  # 23 decisions in batches of 5 (plus the old feedback)
    assert await store.count_decisions() == 5
    assert {r.request_id for r in await store.fetch_decisions()} == {e.decision.request_id for e in new}
    row = await store.get_decision(new[0].decision.request_id)
    assert row is not None and row.feedback_quality == 0.9  # recent feedback kept
    assert await store.prune(90 * DAY, batch_size=5) == 0


async def test_status(store: LogStore) -> None:
    await store.write([log_entry()])
    st = store.status()
    assert st.connected and st.rows_written >= 1 and st.spool_batches == 0 and st.last_error is None


async def test_feedback_source_stored_and_replaced(store: LogStore) -> None:
    entry = log_entry()
    rid = entry.decision.request_id
    await store.write([entry, msgspec.structs.replace(feedback(rid, quality=0.3), source="judge")])
    row = await store.get_decision(rid)
    assert row is not None and (row.feedback_quality, row.feedback_source) == (0.3, "judge")
    await store.write([feedback(rid, quality=0.9)])  # explicit feedback replaces the judge's row
    row = await store.get_decision(rid)
    assert row is not None and (row.feedback_quality, row.feedback_source) == (0.9, "explicit")


async def test_sqlite_file_from_before_feedback_source_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "decisions.db")
    old.execute("CREATE TABLE decision_feedback (request_id TEXT PRIMARY KEY, quality REAL NOT NULL, reward REAL, "
                "payload TEXT NOT NULL, received_at REAL NOT NULL)")
    old.execute("INSERT INTO decision_feedback VALUES ('r-old', 0.5, NULL, '{}', 1.0)")
    old.commit()
    old.close()
    sink = SqliteSink(tmp_path / "decisions.db")
    await sink.open()
    try:
        entry = log_entry()
        await sink.write([entry, msgspec.structs.replace(feedback(entry.decision.request_id, quality=0.2), source="implicit")])
        row = await sink.get_decision(entry.decision.request_id)
        assert row is not None and row.feedback_source == "implicit"
    finally:
        await sink.close()
    check = sqlite3.connect(tmp_path / "decisions.db")
    assert check.execute("SELECT source FROM decision_feedback WHERE request_id = 'r-old'").fetchone() == ("explicit",)
    check.close()


async def test_validator_reason_stored_bounded_and_null_when_none(store: LogStore) -> None:
    failed = log_entry()
    reason = "response_format: properties/age/minimum (Minimum)"
    failed = msgspec.structs.replace(failed, outcome=msgspec.structs.replace(failed.outcome, validator_reason=reason))
    long = log_entry()
    long = msgspec.structs.replace(long, outcome=msgspec.structs.replace(long.outcome, validator_reason="x" * 500))
    fine = log_entry()
    await store.write([failed, long, fine])
    rows = {r.request_id: r for r in await store.fetch_decisions(limit=10)}
    assert rows[failed.decision.request_id].validator_reason == reason
    assert rows[long.decision.request_id].validator_reason == "x" * 200  # the column's bound (sql/0005_validator_reason.sql)
    assert rows[fine.decision.request_id].validator_reason is None
    got = await store.get_decision(failed.decision.request_id)
    assert got is not None and got.validator_reason == reason


_BEFORE_0005 = (",\n    validator_reason TEXT,  -- after the others, so a file from before sql/0005 gets it in the same place with ALTER TABLE"
                "\n    cost_usd REAL  -- last, likewise for sql/0006")
_BEFORE_0006 = ",  -- after the others, so a file from before sql/0005 gets it in the same place with ALTER TABLE\n    cost_usd REAL  -- last, likewise for sql/0006"


@pytest.mark.parametrize("missing", [_BEFORE_0005, _BEFORE_0006], ids=["before-0005", "before-0006"])
async def test_sqlite_file_from_before_a_column_is_upgraded(tmp_path: Path, missing: str) -> None:
    import sqlite3

    from proxy.store.sqlite import SCHEMA

    before = SCHEMA.replace(missing, "")
    assert before != SCHEMA
    old = sqlite3.connect(tmp_path / "decisions.db")
    old.executescript(before)
    old.close()
    sink = SqliteSink(tmp_path / "decisions.db")
    await sink.open()
    try:
        entry = log_entry()
        entry = msgspec.structs.replace(entry, outcome=msgspec.structs.replace(entry.outcome, validator_reason="tool f: required (Required)", cost_usd=0.5))
        await sink.write([entry])
        row = await sink.get_decision(entry.decision.request_id)
        assert row is not None and row.validator_reason == "tool f: required (Required)" and row.status == 200 and row.cost_usd == 0.5
    finally:
        await sink.close()


async def test_cost_usd_stored_and_null_when_unknown(store: LogStore) -> None:
    priced = log_entry()
    priced = msgspec.structs.replace(priced, outcome=msgspec.structs.replace(priced.outcome, cost_usd=0.0012345))
    unknown = log_entry()
    await store.write([priced, unknown])
    rows = {r.request_id: r for r in await store.fetch_decisions(limit=10)}
    assert rows[priced.decision.request_id].cost_usd == 0.0012345
    assert rows[unknown.decision.request_id].cost_usd is None
    got = await store.get_decision(priced.decision.request_id)
    assert got is not None and got.cost_usd == 0.0012345
