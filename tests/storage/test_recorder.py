from __future__ import annotations

import asyncio
from collections.abc import Sequence

from policies.records import Decision, Outcome, Params, RequestContext
from proxy.decision import DecisionRegistry
from proxy.store import LogEntry, Recorder
from proxy.store.entries import Entry

CTX = RequestContext("default", "m", "chat", 10, 1, False, False, False, None, None)


def entry(i: int) -> LogEntry:
    d = Decision(f"r{i}", CTX, 0, Params(), Params(), 1.0, "baseline", "v", "off", 0.0)
    return LogEntry(decision=d, outcome=Outcome(request_id=f"r{i}", status=200, latency_s=0.1))


class MemorySink:
    name = "memory"

    def __init__(self, fail_times: int = 0) -> None:
        self.rows: dict[str, Entry] = {}
        self.fail_times = fail_times
        self.calls = 0

    async def open(self) -> None: ...

    async def write(self, entries: Sequence[Entry]) -> None:
        self.calls += 1
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("down")
        for e in entries:
            assert isinstance(e, LogEntry)
            self.rows.setdefault(e.decision.request_id, e)

    async def close(self) -> None: ...


async def test_full_queue_drops_and_counts_never_blocks() -> None:
    drops = []
    rec = Recorder(MemorySink(), queue_size=3, on_drop=lambda: drops.append(1))
    results = [rec.submit(entry(i)) for i in range(5)]  # not started: nothing drains
    assert results == [True, True, True, False, False]
    assert rec.dropped == 2 and len(drops) == 2


async def test_batches_and_stop_flushes_everything() -> None:
    sink = MemorySink()
    rec = Recorder(sink, batch_size=4, flush_interval_s=10)
    await rec.start()
    for i in range(10):
        rec.submit(entry(i))
    await asyncio.sleep(0.05)
    await rec.stop()
    assert sorted(sink.rows) == sorted(f"r{i}" for i in range(10))


async def test_failing_sink_is_retried_without_loss() -> None:
    sink = MemorySink(fail_times=2)
    rec = Recorder(sink, batch_size=100, flush_interval_s=0.01)
    await rec.start()
    for i in range(7):
        rec.submit(entry(i))
    for _ in range(100):
        if len(sink.rows) == 7:
            break
        await asyncio.sleep(0.05)
    await rec.stop()
    assert len(sink.rows) == 7 and sink.calls >= 3


def test_registry_bounded_and_ttl() -> None:
    reg = DecisionRegistry(max_entries=2, ttl_s=10)
    for i in range(3):
        reg.register(entry(i).decision)
    assert reg.get("r0", 0.0) is None and reg.get("r2", 0.0) is not None
    assert reg.get("r2", 11.0) is None
