"""Spool file behaviour and PostgreSQL outages mid-load: zero lost, zero duplicated."""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import asyncpg
import pytest

from proxy.store import PostgresLogStore, Recorder, StoreUnavailable
from proxy.store.spool import Spool, SpoolingStore
from tests.storage.factory import TcpProxy, feedback, log_entry

pytestmark = pytest.mark.postgres


# --- the spool file on its own ------------------------------------------------------------


def test_spool_append_reopen_commit_truncate(tmp_path: Path) -> None:
    path = tmp_path / "s" / "decisions.spool"
    spool = Spool(path)
    spool.open()
    batches = [[log_entry() for _ in range(3)], [feedback("00000000-0000-0000-0000-000000000001")], [log_entry()]]
    for b in batches:
        spool.append(b)
    assert (spool.batches, spool.entries) == (3, 5)
    assert spool.peek() == batches[0]
    spool.commit()
    spool.close()

    reopened = Spool(path)  # a restart: the offset file says the first batch is done
    reopened.open()
    assert (reopened.batches, reopened.entries) == (2, 2)
    assert reopened.peek() == batches[1]
    reopened.commit()
    assert reopened.peek() == batches[2]
    reopened.commit()
    assert reopened.empty and path.stat().st_size == 0 and not reopened.offset_path.exists()
    reopened.close()


def test_spool_cuts_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "decisions.spool"
    spool = Spool(path)
    spool.open()
    good = [log_entry()]
    spool.append(good)
    spool.close()
    with open(path, "ab") as fh:  # a crash in the middle of the next append
        fh.write(struct.pack(">II", 1000, 0) + b"partial")
    again = Spool(path)
    again.open()
    assert again.batches == 1 and again.peek() == good
    again.append(good)
    assert again.batches == 2 and again.peek() == good
    again.close()


# --- against the real server ----------------------------------------------------------------


async def _count(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        total = await conn.fetchval("SELECT COUNT(*) FROM logged_decisions")
        distinct = await conn.fetchval("SELECT COUNT(DISTINCT request_id) FROM logged_decisions")
        return int(total), int(distinct)
    finally:
        await conn.close()


async def _truncate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DO $$ BEGIN IF to_regclass('logged_decisions') IS NOT NULL THEN "
                           "TRUNCATE logged_decisions, decision_feedback; END IF; END $$")
    finally:
        await conn.close()


def _via(dsn: str, port: int) -> str:
    scheme, rest = dsn.split("://", 1)
    creds, hostpart = rest.split("@", 1)
    _, path = hostpart.split("/", 1)
    return f"{scheme}://{creds}@127.0.0.1:{port}/{path}"


def _spooling(dsn: str, spool_path: Path, app: str = "thermostat") -> SpoolingStore:
    inner = PostgresLogStore(dsn, connect_timeout_s=1.0, command_timeout_s=3.0, application_name=app)
    return SpoolingStore(inner, spool_path, write_timeout_s=2.0, open_timeout_s=2.0, retry_min_s=0.05,
                         retry_max_s=0.3, shutdown_flush_s=3.0)


async def test_outage_mid_load_via_dropping_proxy(pg_dsn: str, tmp_path: Path) -> None:
    """The path to PostgreSQL goes away mid-load (connections cut, new ones refused), then comes back."""
    await _truncate(pg_dsn)
    host_port = pg_dsn.split("@", 1)[1].split("/", 1)[0]
    proxy = TcpProxy(host_port.split(":")[0], int(host_port.split(":")[1]) if ":" in host_port else 5432)
    await proxy.up()
    store = _spooling(_via(pg_dsn, proxy.port), tmp_path / "decisions.spool")
    recorder = Recorder(store, batch_size=50, flush_interval_s=0.02)
    await recorder.start()
    submitted: list[str] = []
    max_spooled = 0
    for i in range(2000):
        entry = log_entry()
        submitted.append(entry.decision.request_id)
        assert recorder.submit(entry)
        if i % 100 == 99:
            await asyncio.sleep(0.02)
            max_spooled = max(max_spooled, store.spool_entries)
        if i == 600:
            await proxy.down()
            down_at = time.monotonic()
        if i == 1400:
            assert store.status().spool_batches > 0 and not store.status().connected
            await asyncio.sleep(0.3)
            await proxy.up()
    assert recorder.dropped == 0
    await recorder.flush()
    assert await store.wait_drained(15)
    assert max_spooled > 0
    assert store.spooled_batches_total > 0 and store.replayed_batches_total == store.spooled_batches_total
    assert time.monotonic() - down_at < 30
    await recorder.stop()
    await proxy.down()
    assert await _count(pg_dsn) == (2000, 2000)  # zero lost, zero duplicated
    assert recorder.write_failures == 0  # the recorder never saw the outage: the spool absorbed it


async def test_terminated_backends_mid_load(pg_dsn: str, tmp_path: Path) -> None:
    """pg_terminate_backend on the writer's connections, repeatedly, while writing."""
    await _truncate(pg_dsn)
    store = _spooling(pg_dsn, tmp_path / "decisions.spool", app="thermostat-kill-test")
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    submitted = 0
    killed = 0
    try:
        for i in range(40):
            batch = [log_entry() for _ in range(50)]
            submitted += len(batch)
            if i % 8 == 4:
                killed += await admin.fetchval(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    "thermostat-kill-test")
            t0 = time.monotonic()
            await store.write(batch)
            assert time.monotonic() - t0 < 2.5  # bounded by the write timeout, never by the outage
            # feedback for the batch, too: upserts keep their order through the spool
            await store.write([feedback(batch[0].decision.request_id, quality=i / 100)])
        assert killed > 0
        assert await store.wait_drained(15)
        assert await _count(pg_dsn) == (submitted, submitted)
        fb = await admin.fetchval("SELECT COUNT(*) FROM decision_feedback")
        assert fb == 40
    finally:
        await admin.close()
        await store.close()


async def test_start_while_down_then_next_start_replays(pg_dsn: str, tmp_path: Path) -> None:
    """Database unreachable from the start: writes spool, shutdown keeps them, the next start replays them."""
    await _truncate(pg_dsn)
    spool_path = tmp_path / "decisions.spool"
    dead_dsn = _via(pg_dsn, 1)  # nothing listens on port 1
    store = _spooling(dead_dsn, spool_path)
    store.shutdown_flush_s = 0.3
    await store.open()  # does not raise
    assert not store.status().connected
    batches = [[log_entry() for _ in range(25)] for _ in range(8)]
    for b in batches:
        t0 = time.monotonic()
        await store.write(b)
        assert time.monotonic() - t0 < 0.5
    assert (store.spool_batches, store.spool_entries) == (8, 200)
    with pytest.raises(StoreUnavailable):
        await store.count_decisions()
    await store.close()
    assert spool_path.stat().st_size > 0

    # one batch already reached the database before the restart (e.g. a timeout after commit)
    direct = PostgresLogStore(pg_dsn)
    await direct.open()
    await direct.write(batches[0])
    await direct.close()

    restarted = _spooling(pg_dsn, spool_path)
    await restarted.open()
    assert await restarted.wait_drained(10)
    assert await restarted.count_decisions() == 200
    assert await _count(pg_dsn) == (200, 200)
    await restarted.close()
    assert spool_path.stat().st_size == 0


async def test_shutdown_flushes_spool_when_db_is_back(pg_dsn: str, tmp_path: Path) -> None:
    await _truncate(pg_dsn)
    host_port = pg_dsn.split("@", 1)[1].split("/", 1)[0]
    proxy = TcpProxy("127.0.0.1", int(host_port.split(":")[1]) if ":" in host_port else 5432)
    await proxy.up()
    store = _spooling(_via(pg_dsn, proxy.port), tmp_path / "decisions.spool")
    store.retry_min_s = store.retry_max_s = 30.0  # the background replayer will not get to it first
    await store.open()
    await store.write([log_entry() for _ in range(10)])
    await proxy.down()
    await store.write([log_entry() for _ in range(10)])
    assert store.spool_entries == 10
    await proxy.up()
    await store.close()  # replays what it can within shutdown_flush_s
    await proxy.down()
    assert await _count(pg_dsn) == (20, 20)


async def test_bad_record_is_set_aside_not_blocking(pg_dsn: str, tmp_path: Path) -> None:
    """A record PostgreSQL refuses as data (NUL in jsonb) goes to the .rejected file; its batch-mates are written."""
    await _truncate(pg_dsn)
    store = _spooling(pg_dsn, tmp_path / "decisions.spool")
    await store.open()
    good = [log_entry() for _ in range(5)]
    poisoned = feedback(good[0].decision.request_id)
    poisoned.payload = {"note": "a\x00b"}
    nul_prompt = log_entry(prompt="x\x00y")  # sanitised, not refused
    await store.write([*good, poisoned, nul_prompt])
    assert await store.wait_drained(10)
    await store.write([log_entry()])  # the queue moves on
    assert await store.wait_drained(10)
    assert await _count(pg_dsn) == (7, 7)
    assert store.status().dead_letter_batches == 1
    rejected = Spool(store.spool.rejected_path)
    rejected.offset_path = tmp_path / "none.offset"
    rejected.open()
    assert rejected.peek() == [poisoned]
    rejected.close()
    row = await store.get_decision(nul_prompt.decision.request_id)
    assert row is not None and row.prompt == "x\ufffdy"
    await store.close()


def test_prune_cli(pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    asyncio.run(_truncate(pg_dsn))
    now = time.time()

    async def seed(store_factory) -> None:  # type: ignore[no-untyped-def]
        s = store_factory()
        await s.open()
        await s.write([log_entry(created_at=now - 100 * 86400 - i) for i in range(12)] + [log_entry(created_at=now - 5)])
        await s.close()

    from proxy.store import SqliteSink

    for url in (pg_dsn, ""):
        data = tmp_path / ("pg" if url else "lite")
        cfg = tmp_path / f"{data.name}.toml"
        cfg.write_text(f'[storage]\ndatabase_url = "{url}"\n[server]\ndata_dir = "{data}"\n')
        factory = (lambda: PostgresLogStore(pg_dsn)) if url else (lambda data=data: SqliteSink(data / "decisions.sqlite3"))
        asyncio.run(seed(factory))
        assert main(["prune", "--older-than", "90d", "--batch-size", "5", "--config", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "pruned 12 decision(s) older than 90 day(s)" in out and "in 3 batch(es)" in out
        assert main(["prune", "--config", str(cfg)]) == 0  # storage.retention_days (90) by default
        assert "pruned 0 decision(s)" in capsys.readouterr().out
    assert main(["prune", "--older-than", "soon", "--config", str(cfg)]) == 2


def test_spool_refuses_a_second_process_on_the_same_file(tmp_path: Path) -> None:
    first = Spool(tmp_path / "decisions.spool")
    first.open()
    second = Spool(tmp_path / "decisions.spool")
    with pytest.raises(RuntimeError, match="own server.data_dir"):
        second.open()
    first.close()
    second.open()  # free again once the first one closed
    second.close()
