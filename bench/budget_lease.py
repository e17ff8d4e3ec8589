"""Request-path latency of the budget check: one Redis round trip per request vs. budget leases.

For each added Redis latency (a loopback TCP proxy holding every reply back; "direct"
is Redis itself), `concurrency` simulated requests run for `seconds`: the budget
decision (what a request waits for before it is forwarded), a stand-in upstream call
of `--upstream-ms`, then the settle. Two modes over the same `BudgetGuard` code:

- ``per-request``: ``caws.lease_enabled = false``, one Lua script per decision;
- ``leased``: a `LeaseBook` filled by the `LeaseRefiller` background task, as
  `proxy.runtime` wires it for replicas on Redis.

Reports the decision's p50/p99/max and how many requests were admitted (a decision
that exceeds ``store_timeout_s`` is refused under ``on_exhausted = "reject"``).

Bursty traffic (issue 21), ``--bursty``: the replicas of the issue's reproduction, each a
`BudgetGuard` with its own `LeaseBook`, `LeaseRefiller` and Redis connection, default lease
timers, ``on_exhausted = "reject"``: one replica with a 5,000-token cap, 9 bursts of 15
requests 4.5 s apart; three replicas with a 30,000 cap, 8 bursts of 80 (spread over the
three) 3 s apart. Every request reserves 250 tokens and uses 123. Reports the tokens
served against the cap, refusals, and what Redis counted once the replicas stopped.

Needs Redis on 127.0.0.1:6379. Results: bench/results/budget-lease-<date>.md and .json
(``--bursty``: budget-bursty-<date>.md and .json).

    .venv/bin/python -m bench.budget_lease            # ~40 s
    .venv/bin/python -m bench.budget_lease --seconds 1 --latencies-ms 0,150
    .venv/bin/python -m bench.budget_lease --bursty   # ~70 s
    # before/after: run the same file in an old checkout with --bursty --json-only --label old > old.jsonl,
    # then here with --bursty --before old.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guards.budget import BudgetGuard  # noqa: E402
from guards.lease import LeaseBook  # noqa: E402
from guards.settings import CawsSettings  # noqa: E402
from policies.records import Arm  # noqa: E402
from proxy.decision.lease_refill import LeaseRefiller  # noqa: E402
from proxy.store.redis_state import RedisStore  # noqa: E402
from tests.support.forwarder import Forwarder  # noqa: E402

BASE = Arm(0.7, 200)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(url: str, *, leased: bool, seconds: float, concurrency: int, upstream_ms: float) -> dict[str, Any]:
    settings = CawsSettings(budget_limit=10**12, on_exhausted="reject", lease_enabled=leased)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(url, prefix=prefix, timeout_s=2.0)
    book = LeaseBook(settings, holder=store.instance_id) if leased else None
    guard = BudgetGuard(settings, store, leases=book)
    refiller = LeaseRefiller(guard, book, store, clock=time.time, call_timeout_s=settings.lease_ttl_s / 2) if book is not None else None
    if refiller is not None:
        refiller.start()
    decide_ms: list[float] = []
    admitted = refused = 0

    async def client(stop_at: float, record: bool) -> None:
        nonlocal admitted, refused
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            v = await guard.decide(allowed=[BASE], chosen=None, baseline=BASE, task_type="chat", prompt_tokens=50, confidence=None, now=time.time())
            took = (time.perf_counter() - t0) * 1000
            if record:
                decide_ms.append(took)
                admitted += v.action == "send"
                refused += v.action == "reject"
            if v.action == "send":
                await asyncio.sleep(upstream_ms / 1000)
                await guard.settle(v.reservation, 120, time.time())

    warm = time.monotonic() + 1.0  # the first lease, the script load, the connections
    await asyncio.gather(*(client(warm, False) for _ in range(concurrency)))
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(stop, True) for _ in range(concurrency)))
    if refiller is not None:
        await refiller.stop()
    keys = [k async for k in store.redis.scan_iter(match=prefix + "*")]
    if keys:
        await store.redis.delete(*keys)
    await store.aclose()
    return {
        "mode": "leased" if leased else "per-request",
        "requests": len(decide_ms),
        "admitted": admitted,
        "refused": refused,
        "p50_ms": round(statistics.median(decide_ms), 3),
        "p99_ms": round(pct(decide_ms, 0.99), 3),
        "max_ms": round(max(decide_ms), 3),
    }


async def bursty(*, replicas: int, limit: int, bursts: int, per_burst: int, gap_s: float) -> dict[str, Any]:
    """The issue's bursts: `per_burst` requests at once (round-robin over the replicas), then `gap_s` idle."""
    settings = CawsSettings(budget_limit=limit, on_exhausted="reject", store_timeout_s=0.5)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    stores = [RedisStore("redis://127.0.0.1:6379/0", prefix=prefix, timeout_s=2.0) for _ in range(replicas)]
    guards: list[BudgetGuard] = []
    refillers: list[LeaseRefiller] = []
    for store in stores:
        book = LeaseBook(settings, holder=store.instance_id)
        guard = BudgetGuard(settings, store, leases=book)
        refiller = LeaseRefiller(guard, book, store, clock=time.time, call_timeout_s=settings.lease_ttl_s / 2)
        refiller.start()
        guards.append(guard)
        refillers.append(refiller)
    served = refused = 0

    async def one(guard: BudgetGuard) -> None:
        nonlocal served, refused
        v = await guard.decide(allowed=[BASE], chosen=None, baseline=BASE, task_type="chat", prompt_tokens=50, confidence=None, now=time.time())
        if v.action != "send":
            refused += 1
            return
        await asyncio.sleep(0.05)  # the upstream
        await guard.settle(v.reservation, USED, time.time())
        served += USED

    for b in range(bursts):
        await asyncio.gather(*(one(guards[i % replicas]) for i in range(per_burst)))
        if b < bursts - 1:
            await asyncio.sleep(gap_s)
    for refiller in refillers:
        await refiller.stop()
    key = f"{prefix}caws:{guards[0].window_start(time.time())}:all"
    used, reserved = (int(v or 0) for v in await stores[0].redis.hmget(key, "used", "reserved"))
    keys = [k async for k in stores[0].redis.scan_iter(match=prefix + "*")]
    if keys:
        await stores[0].redis.delete(*keys)
    for store in stores:
        await store.aclose()
    return {
        "replicas": replicas, "limit": limit, "bursts": bursts, "per_burst": per_burst, "gap_s": gap_s,
        "asked": bursts * per_burst * USED, "served": served, "refused": refused,
        "served_over_limit": round(served / limit, 3), "redis_used": used, "redis_reserved": reserved,
    }


BURSTY = (
    {"replicas": 1, "limit": 5_000, "bursts": 9, "per_burst": 15, "gap_s": 4.5},
    {"replicas": 3, "limit": 30_000, "bursts": 8, "per_burst": 80, "gap_s": 3.0},
)
USED = 123  # tokens a request actually uses (of the 250 it reserves)


def write_bursty(rows: list[dict[str, Any]]) -> Path:
    day = dt.date.today().isoformat()
    out = ROOT / "bench" / "results" / f"budget-bursty-{day}"
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        f"# Budget leases under bursty traffic ({day})",
        "",
        "`python -m bench.budget_lease --bursty`: default lease timers (`lease_horizon_s` 2, `lease_ttl_s` 10, "
        "`lease_refill_s` 0.2), `on_exhausted = \"reject\"`, Redis direct; each request reserves 250 tokens and uses 123. "
        "`code` is the checkout measured.",
        "",
        "| code | replicas | cap | bursts x requests, gap | asked | served | served / cap | refused | Redis used after stop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('code', 'this')} | {r['replicas']} | {r['limit']:,} | {r['bursts']} x {r['per_burst']}, {r['gap_s']:g} s | "
            f"{r['asked']:,} | {r['served']:,} | {r['served_over_limit']} | {r['refused']} | {r['redis_used']:,} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out.with_suffix(".md")


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for latency in [float(x) for x in args.latencies_ms.split(",")]:
        fwd: Forwarder | None = None
        url = "redis://127.0.0.1:6379/0"
        if latency > 0:
            fwd = Forwarder(delay_s=latency / 1000)
            fwd.start()
            url = f"redis://127.0.0.1:{fwd.port}/0"
        try:
            for leased in (False, True):
                row = await measure(url, leased=leased, seconds=args.seconds, concurrency=args.concurrency, upstream_ms=args.upstream_ms)
                row["redis_latency_ms"] = latency
                rows.append(row)
                print(json.dumps(row))
        finally:
            if fwd is not None:
                fwd.close()
    return rows


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    day = dt.date.today().isoformat()
    out = ROOT / "bench" / "results" / f"budget-lease-{day}"
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Budget check on the request path: per-request Redis round trip vs. leases ({day})",
        "",
        f"`python -m bench.budget_lease --seconds {args.seconds} --concurrency {args.concurrency} "
        f"--upstream-ms {args.upstream_ms} --latencies-ms {args.latencies_ms}`; `store_timeout_s` = 0.1, "
        "`on_exhausted = \"reject\"`, limit never reached. Latency = time in `BudgetGuard.decide` "
        "(what a request waits before it is forwarded).",
        "",
        "| Redis added latency | mode | requests | admitted | refused | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = "direct" if r["redis_latency_ms"] == 0 else f"+{r['redis_latency_ms']:g} ms"
        lines.append(
            f"| {label} | {r['mode']} | {r['requests']} | {r['admitted']} | {r['refused']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out.with_suffix(".md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--upstream-ms", type=float, default=20.0)
    parser.add_argument("--latencies-ms", default="0,1,5,150")
    parser.add_argument("--bursty", action="store_true", help="the bursty-traffic scenarios instead of the latency table")
    parser.add_argument("--label", default="this", help="with --bursty: the name of the checkout measured (a table column)")
    parser.add_argument("--json-only", action="store_true", help="with --bursty: print the rows, write no result file")
    parser.add_argument("--before", help="with --bursty: a file of rows printed by --json-only in another checkout, shown first")
    ns = parser.parse_args()
    if ns.bursty:
        rows = [json.loads(line) for line in Path(ns.before).read_text().splitlines() if line.strip()] if ns.before else []
        for scenario in BURSTY:
            row = {"code": ns.label, **asyncio.run(bursty(**scenario))}  # type: ignore[arg-type]
            print(json.dumps(row))
            rows.append(row)
        if not ns.json_only:
            print(write_bursty(rows))
    else:
        result = asyncio.run(main(ns))
        print(write(result, ns))
