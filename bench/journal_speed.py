"""What the crash journal adds to one request: two appends (decision before forwarding, entry after).

Each measured iteration appends a `PendingDecision` and its `LogEntry` (a realistic
2 kB chat context, context features, outcome) to a real `Journal` on the data disk,
with the background fsync thread running as in production; the encode-only cost is
shown for comparison. The embedded default's budget journaling is measured the same
way: one reserve + one settle through `InProcessStore` with and without the change
journal attached.

    .venv/bin/python bench/journal_speed.py            # writes bench/results/journal_speed.md
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guards.state import BudgetKey, Candidate, InProcessStore, StateChange
from policies.context import build_context, context_features
from policies.records import Decision, Outcome, Params
from proxy.store.entries import LogEntry
from proxy.store.journal import Journal, PendingDecision

ITERATIONS = 20_000
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "You write code."}, {"role": "user", "content": "x" * 2000}],
    "temperature": 0.7,
    "max_tokens": 512,
}


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "p99_us": ordered[int(0.99 * (len(ordered) - 1))] * 1e6,
    }


def records(i: int) -> tuple[PendingDecision, LogEntry]:
    ctx = build_context(BODY, task_type="code", endpoint="chat", upstream="openai")
    rid = f"01a227de-e943-7f2c-8a31-{i:012d}"
    d = Decision(rid, ctx, 123456789, Params(0.8, 612), Params(0.7, 512), 0.31, "thompson_gaussian", "ts-1", "optimized",
                 time.time(), Params(0.8, 612), 0.31, 7, ("budget:chosen",), 1200)
    o = Outcome(rid, 200, 0.84, 0.21, 600, 140, "stop", None, 0.9, 0.71)
    return PendingDecision(d), LogEntry(decision=d, outcome=o, context_features=context_features(ctx))


def measure_requests(folder: Path) -> dict[str, dict[str, float]]:
    journal = Journal(folder)
    journal.open()
    encode = msgspec.msgpack.Encoder().encode
    pend, entry = records(0)
    size = len(encode(pend)) + len(encode(entry))
    enc_t: list[float] = []
    app_t: list[float] = []
    clock = time.perf_counter
    for _ in range(ITERATIONS):
        t0 = clock()
        encode(pend)
        encode(entry)
        t1 = clock()
        journal.append(pend)
        journal.append(entry)
        t2 = clock()
        enc_t.append(t1 - t0)
        app_t.append(t2 - t1 + (t1 - t0))
    fsyncs = journal.fsyncs
    journal.close(clean=True)
    return {"encode only (2 records)": _stats(enc_t), f"journal append, 2 records ({size} B)": _stats(app_t),
            "_fsyncs": {"median_us": fsyncs, "mean_us": fsyncs, "p99_us": fsyncs}}


async def _budget(store: InProcessStore) -> list[float]:
    keys = [BudgetKey("caws:0:all", limit=10**12, gate=10**12), BudgetKey("caws:0:task:code", limit=10**12, gate=10**12)]
    out: list[float] = []
    clock = time.perf_counter
    for _ in range(ITERATIONS):
        t0 = clock()
        await store.budget_reserve(keys, [Candidate(1200)], now=1.0, expires_at=1e9)
        await store.budget_settle([k.key for k in keys], 1200, 740, now=1.0, expires_at=1e9)
        out.append(clock() - t0)
    return out


def measure_budget(folder: Path) -> dict[str, dict[str, float]]:
    plain = asyncio.run(_budget(InProcessStore()))
    journal = Journal(folder, name="state", record_type=StateChange)
    journal.open()
    journaled = asyncio.run(_budget(InProcessStore(on_change=journal.append)))
    journal.close(clean=True)
    return {"budget reserve + settle, in memory": _stats(plain), "budget reserve + settle, journaled (4 changes)": _stats(journaled)}


def main() -> None:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        rows = {**measure_requests(Path(tmp) / "j"), **measure_budget(Path(tmp) / "s")}
    fsyncs = int(rows.pop("_fsyncs")["median_us"])
    lines = [
        "# Crash journal: added cost per request",
        "",
        f"`.venv/bin/python bench/journal_speed.py`, {ITERATIONS:,} iterations, {platform.python_version()}, "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}; data disk of the worktree; background fsync every 0.2 s "
        f"({fsyncs} fsyncs ran during the append loop).",
        "",
        "| operation | median µs | mean µs | p99 µs |",
        "|---|---:|---:|---:|",
    ]
    for name, st in rows.items():
        lines.append(f"| {name} | {st['median_us']:.2f} | {st['mean_us']:.2f} | {st['p99_us']:.2f} |")
    out = Path(__file__).resolve().parent / "results" / "journal_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
