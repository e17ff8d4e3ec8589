"""The embedded default's state under `data_dir`: a restarted single instance resumes where it stopped.

Without Redis, the token budget (used and reserved tokens per window), the waivers,
the rollout state (phase, rollback, recent history) and the learned posterior lived
only in memory: a restart forgot the learning, fell back to the configured phase and
reset the budget to zero used. `LocalState` keeps them in ``data_dir/state/``:

* ``state.sqlite3``: a snapshot (one row per budget key, blob, counter, map field, plus
  the policy's and the baseline costs' statistics), rewritten in one transaction every
  `interval_s` when something changed, and at shutdown. Written in a thread.
* ``state.<n>.log``: every change of the `InProcessStore` between snapshots, appended
  by the crash journal (`proxy.store.journal.Journal`: group-committed, one `os.write`
  per loop iteration, fsync in the background). Changes carry new values, not deltas, so `load()` replays the journal
  over the snapshot in order and lands on the exact state at the moment of a
  `kill -9`. A snapshot seals the active segment first and deletes the sealed ones
  once its transaction has committed.

The posterior is the exception: it changes on every request, so it is snapshotted
only (every `interval_s`), and a `kill -9` forgets at most that much learning.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgspec

from guards.state import InProcessStore, StateChange, StateDump
from proxy.store.journal import Journal, delete

log = logging.getLogger("thermostat.store.local_state")

Stats = dict[str, list[float]]
_encode = msgspec.msgpack.Encoder().encode
_decode_stats = msgspec.msgpack.Decoder(Stats).decode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    kind TEXT NOT NULL,      -- budget | blob | counter | map | stats
    key TEXT NOT NULL,
    field TEXT NOT NULL DEFAULT '',
    value BLOB,
    PRIMARY KEY (kind, key, field)
);
"""

_budget = msgspec.msgpack.Decoder(tuple[int, int, int, float]).decode


class LocalState:
    """Snapshot + change journal of one `InProcessStore` and the learned statistics (see the module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        store: InProcessStore,
        *,
        stats: dict[str, tuple[Callable[[], Stats], Callable[[Stats], None]]],
        interval_s: float = 1.0,
        fsync_interval_s: float = 0.2,
    ) -> None:
        self.folder = Path(folder)
        self.store = store
        self.stats = stats  # name -> (snapshot, load_totals)
        self.interval_s = interval_s
        self.journal = Journal(self.folder, name="state", record_type=StateChange, fsync_interval_s=fsync_interval_s)
        self._task: asyncio.Task[None] | None = None
        self._saved_version = -1
        self._saved_stats: dict[str, bytes] = {}
        self._marks = 0
        self.snapshots = 0

    @property
    def db_path(self) -> Path:
        return self.folder / "state.sqlite3"

    # --- start ---------------------------------------------------------------------------

    def _read_snapshot(self) -> tuple[StateDump, dict[str, Stats]]:
        budgets: dict[str, tuple[int, int, int, float]] = {}
        blobs: dict[str, bytes] = {}
        counters: dict[str, int] = {}
        maps: dict[str, dict[str, bytes]] = {}
        stats: dict[str, Stats] = {}
        db = sqlite3.connect(self.db_path)
        try:
            db.executescript(_SCHEMA)
            for kind, key, field, value in db.execute("SELECT kind, key, field, value FROM state"):
                if kind == "budget":
                    budgets[key] = _budget(value)
                elif kind == "blob":
                    blobs[key] = bytes(value)
                elif kind == "counter":
                    counters[key] = int(msgspec.msgpack.decode(value))
                elif kind == "map":
                    maps.setdefault(key, {})[field] = bytes(value)
                elif kind == "stats":
                    stats[key] = _decode_stats(value)
        finally:
            db.close()
        return StateDump(budgets=budgets, blobs=blobs, counters=counters, maps=maps), stats

    def _load(self) -> dict[str, Stats]:
        self.folder.mkdir(parents=True, exist_ok=True)
        dump, stats = self._read_snapshot()
        self.store.restore(dump)
        changes = self.journal.open()
        for change in changes:
            self.store.apply(change)
        if changes or dump.budgets or dump.blobs or stats:
            log.info("restored local state from %s (%d journaled change(s) replayed)", self.folder, len(changes))
        return stats

    async def start(self) -> None:
        """Restore everything (blocking work in a thread), then journal changes and snapshot periodically."""
        stats = await asyncio.to_thread(self._load)
        for name, (_, load) in self.stats.items():
            if name in stats:
                load(stats[name])
        # Write what was restored, so the replayed segments can go.
        await self.snapshot(force=True)
        await asyncio.to_thread(self.journal.replayed)
        self.store.on_change = self.journal.add  # group-committed: one os.write per loop iteration
        self._task = asyncio.create_task(self._snapshot_forever(), name="thermostat-local-state")

    # --- snapshots -------------------------------------------------------------------------

    def _write(self, dump: StateDump, stats: dict[str, bytes]) -> None:
        rows: list[tuple[str, str, str, bytes]] = []
        rows += [("budget", k, "", _encode(v)) for k, v in dump.budgets.items()]
        rows += [("blob", k, "", v) for k, v in dump.blobs.items()]
        rows += [("counter", k, "", _encode(v)) for k, v in dump.counters.items()]
        rows += [("map", k, f, v) for k, m in dump.maps.items() for f, v in m.items()]
        rows += [("stats", k, "", v) for k, v in stats.items()]
        db = sqlite3.connect(self.db_path)
        try:
            with db:
                db.executescript(_SCHEMA)
                db.execute("DELETE FROM state")
                db.executemany("INSERT INTO state (kind, key, field, value) VALUES (?, ?, ?, ?)", rows)
        finally:
            db.close()

    async def snapshot(self, *, force: bool = False) -> None:
        """Dump on the loop (consistent with the journal's seal), write in a thread, then drop sealed segments."""
        stats = {name: _encode(snap()) for name, (snap, _) in self.stats.items()}
        if not force and self.store.version == self._saved_version and stats == self._saved_stats:
            return
        version = self.store.version
        dump = self.store.dump()
        self._marks += 1
        mark = self._marks
        self.journal.seal(mark)  # changes from here on go to a new segment
        await asyncio.to_thread(self._write, dump, stats)
        self._saved_version = version
        self._saved_stats = stats
        self.snapshots += 1
        done = self.journal.release(mark)
        if done:
            await asyncio.to_thread(delete, done)

    async def _snapshot_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.snapshot()
            except Exception:  # noqa: BLE001 - the journal still holds every change; the next round retries
                log.exception("snapshotting the local state to %s failed", self.db_path)

    async def stop(self) -> None:
        if self.store.on_change is None:
            return  # never started: an empty snapshot must not overwrite the saved state
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        clean = True
        try:
            await self.snapshot(force=True)
        except Exception:  # noqa: BLE001 - keep the journal for the next start
            log.exception("final snapshot of the local state failed; the journal keeps the changes")
            clean = False
        self.store.on_change = None
        await asyncio.to_thread(self.journal.close, clean=clean)
