"""The embedded default's state under data_dir: snapshot + change journal restore the exact state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guards.state import BudgetKey, Candidate, InProcessStore
from proxy.store import LocalState

NOW = 1_000.0
KEYS = [BudgetKey("caws:0:all", limit=1_000, gate=800)]


class Stats:
    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def snapshot(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.totals.items()}

    def load_totals(self, totals: dict[str, list[float]]) -> None:
        self.totals = {k: list(v) for k, v in totals.items()}


def local(folder: Path, store: InProcessStore, stats: Stats) -> LocalState:
    return LocalState(folder, store, stats={"policy": (stats.snapshot, stats.load_totals)}, interval_s=3600)


async def spend(store: InProcessStore) -> None:
    await store.budget_reserve(KEYS, [Candidate(300)], now=NOW, expires_at=NOW + 60)
    await store.budget_settle([KEYS[0].key], 300, 120, now=NOW, expires_at=NOW + 60)
    await store.budget_reserve(KEYS, [Candidate(50)], now=NOW, expires_at=NOW + 60)  # still in flight
    await store.set("rollout:state", b'{"phase":"canary"}')
    await store.map_put("waivers", "WV-0001", b"{}")
    await store.map_put("waivers", "WV-0002", b"{}")
    await store.map_delete("waivers", "WV-0001")
    await store.incr("waiver-id")


async def crash(state: LocalState) -> None:
    """What kill -9 leaves: no final snapshot; the journal's writes are in the file."""
    assert state._task is not None
    state._task.cancel()
    await asyncio.gather(state._task, return_exceptions=True)
    await asyncio.to_thread(state.journal.close, clean=False)


async def test_changes_after_the_last_snapshot_survive_a_crash(tmp_path: Path) -> None:
    store, stats = InProcessStore(), Stats()
    stats.totals = {"b#arm": [3.0, 1.5]}
    state = local(tmp_path, store, stats)
    await state.start()  # snapshot now holds the posterior and an empty store
    await spend(store)
    await crash(state)

    again, restored = InProcessStore(), Stats()
    state2 = local(tmp_path, again, restored)
    await state2.start()
    assert again.dump() == store.dump()
    (counters,) = await again.budget_read([KEYS[0].key], now=NOW)
    assert (counters.used, counters.reserved) == (120, 50)  # not reset to zero used
    assert await again.map_get_all("waivers") == {"WV-0002": b"{}"}
    assert await again.incr("waiver-id") == 2
    assert restored.totals == {"b#arm": [3.0, 1.5]}
    await state2.stop()


async def test_clean_stop_snapshots_everything_and_leaves_no_journal(tmp_path: Path) -> None:
    store, stats = InProcessStore(), Stats()
    state = local(tmp_path, store, stats)
    await state.start()
    await spend(store)
    stats.totals = {"b#arm": [7.0, 2.0]}
    await state.stop()
    assert list(tmp_path.glob("state.*.log")) == []

    again, restored = InProcessStore(), Stats()
    state2 = local(tmp_path, again, restored)
    await state2.start()
    assert again.dump() == store.dump()
    assert restored.totals == {"b#arm": [7.0, 2.0]}
    await state2.stop()


async def test_snapshot_drops_the_journal_segments_it_covers(tmp_path: Path) -> None:
    store, stats = InProcessStore(), Stats()
    state = local(tmp_path, store, stats)
    await state.start()
    await spend(store)
    before = len(list(tmp_path.glob("state.*.log")))
    await state.snapshot()
    assert len(list(tmp_path.glob("state.*.log"))) == 1 <= before  # only the fresh active segment
    await store.budget_settle([KEYS[0].key], 50, 10, now=NOW, expires_at=NOW + 60)
    await crash(state)
    again = InProcessStore()
    state2 = local(tmp_path, again, Stats())
    await state2.start()
    (counters,) = await again.budget_read([KEYS[0].key], now=NOW)
    assert (counters.used, counters.reserved) == (130, 0)
    await state2.stop()
