"""Open-loop LLM-shaped load: Poisson arrivals on a fixed schedule, one shard per process.

    python -m bench.llmload.loadgen --url http://127.0.0.1:9101/v1/chat/completions \
        --rate 100 --warmup 10 --duration 20 --seed 1 --shard 0/2 --start-ns <CLOCK_MONOTONIC ns> --out shard0.npz

Every process builds the same schedule from `--seed` (arrival times and answer shapes, see
`schedule`) and sends the requests whose index falls in its shard, each at its *scheduled*
time, however late the target is (no coordinated omission). Several processes share the
load when one Python client cannot keep up; each measures its own event-loop lag, so a
run can tell when the generator, not the target, is the bottleneck.

Measured, for what happens in the window [start + warmup, start + warmup + duration):
* per chunk: arrival here minus the upstream's `~T` send stamp (transit through the target);
* per streamed request scheduled in the window: TTFT beyond the upstream's own time, that is
  first-chunk arrival - scheduled start - (first-chunk send - request arrival at the upstream);
* per non-streamed request: the same for the whole answer;
* in-flight requests every 250 ms; this process's loop lag every 10 ms.

Bounded: requests still open 3 s after the window are cut (every stream's first chunk is due
within 0.8 s); the whole run is capped by `--timeout`. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from array import array
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

MARK_T = re.compile(rb"~T(\d+)")
MARK_R = re.compile(rb"~R(\d+)")
MODEL = "fake-model"


@dataclass(frozen=True)
class Shape:
    """The answer the upstream is asked to produce, from the issue's ranges."""

    ttft_ms: float
    tps: float
    tokens: int
    chunk: int
    stream: bool
    pad: int = 0

    @property
    def seconds(self) -> float:
        return self.ttft_ms / 1000 + self.tokens / self.tps

    def prompt(self) -> str:
        return f"bench ttft_ms={self.ttft_ms:.1f} tps={self.tps:.2f} tokens={self.tokens} chunk={self.chunk} pad={self.pad}"


def draw_shape(rng: random.Random, nonstream_frac: float) -> Shape:
    return Shape(
        ttft_ms=rng.uniform(200, 800), tps=rng.uniform(30, 100), tokens=rng.randint(100, 1000),
        chunk=rng.randint(1, 5), stream=rng.random() >= nonstream_frac,
    )


def mean_duration_s(nonstream_frac: float, seed: int = 12345, n: int = 50_000) -> float:
    """Mean answer time of the shape distribution (~10 s), to turn a concurrency into an arrival rate."""
    rng = random.Random(seed)
    return sum(draw_shape(rng, nonstream_frac).seconds for _ in range(n)) / n


def schedule(rate: float, horizon_s: float, seed: int, nonstream_frac: float) -> list[tuple[float, Shape]]:
    """Poisson arrivals at `rate`/s over `horizon_s` seconds, each with its answer shape."""
    rng = random.Random(seed)
    out: list[tuple[float, Shape]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon_s:
            return out
        out.append((t, draw_shape(rng, nonstream_frac)))


def request_body(shape: Shape) -> bytes:
    doc: dict = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": shape.prompt()}],
        "temperature": 0.7,
        "max_tokens": 1024,
    }
    if shape.stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise SystemExit(f"refusing non-loopback target {host!r}")


class Recorder:
    """What one shard measured, in µs; `in_window` decides what counts."""

    def __init__(self, t_measure_ns: int, t_end_ns: int) -> None:
        self.t_measure = t_measure_ns
        self.t_end = t_end_ns
        self.chunk_us = array("q")
        self.ttft_excess_us = array("q")
        self.request_leg_us = array("q")  # scheduled start -> request arrival at the upstream
        self.whole_excess_us = array("q")
        self.lag_us = array("q")
        self.inflight = array("q")
        self.late_start_us = array("q")  # how late this process started a request vs its schedule
        self.errors: dict[str, int] = {}
        self.done_streams = 0
        self.done_whole = 0
        self.chunks_total = 0  # chunks seen in the window (for CPU per chunk)
        self.completed_in_window = 0

    def in_window(self, t_ns: int) -> bool:
        return self.t_measure <= t_ns < self.t_end

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one(session, url: str, body: bytes, shape: Shape, t_sched_ns: int, rec: Recorder, timeout: float) -> None:  # type: ignore[no-untyped-def]
    import aiohttp

    counted = rec.in_window(t_sched_ns)
    now = time.monotonic_ns()
    if counted:
        rec.late_start_us.append((now - t_sched_ns) // 1000)
    try:
        async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                await resp.read()
                if counted:
                    rec.error(f"http_{resp.status}")
                return
            if not shape.stream:
                raw = await resp.read()
                t = time.monotonic_ns()
                m, r = MARK_T.search(raw), MARK_R.search(raw)
                if m is None or r is None:
                    if counted:
                        rec.error("no_stamp")
                    return
                if counted:
                    rec.whole_excess_us.append((t - t_sched_ns - (int(m[1]) - int(r[1]))) // 1000)
                    rec.request_leg_us.append((int(r[1]) - t_sched_ns) // 1000)
                    rec.done_whole += 1
                if rec.in_window(t):
                    rec.completed_in_window += 1
                return
            carry = b""
            first = True
            async for data in resp.content.iter_any():
                t = time.monotonic_ns()
                buf = carry + data if carry else data
                cut = buf.rfind(b"\n\n") + 2
                carry = buf[cut:]
                if cut <= 1:
                    continue
                events = buf[:cut]
                win = rec.in_window(t)
                for m in MARK_T.finditer(events):
                    sent = int(m[1])
                    if win:
                        rec.chunk_us.append((t - sent) // 1000)
                        rec.chunks_total += 1
                    if first:
                        first = False
                        r = MARK_R.search(events)
                        if counted and r is not None:
                            recv = int(r[1])
                            rec.ttft_excess_us.append((t - t_sched_ns - (sent - recv)) // 1000)
                            rec.request_leg_us.append((recv - t_sched_ns) // 1000)
            if first and counted:
                rec.error("no_chunks")
            elif counted:
                rec.done_streams += 1
            if rec.in_window(time.monotonic_ns()):
                rec.completed_in_window += 1
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        if counted:
            rec.error("timeout")
    except Exception as exc:  # noqa: BLE001 - a load generator counts errors, it does not crash
        if counted:
            rec.error(type(exc).__name__)


async def watch_lag(rec: Recorder, stop: asyncio.Event) -> None:
    """How late a 10 ms sleep wakes up in this process: the generator's own loop lag."""
    while not stop.is_set():
        t = time.monotonic_ns()
        await asyncio.sleep(0.01)
        late = time.monotonic_ns() - t - 10_000_000
        if rec.in_window(t):
            rec.lag_us.append(max(0, late) // 1000)


async def run(a: argparse.Namespace) -> dict:
    import aiohttp

    index, shards = (int(x) for x in a.shard.split("/"))
    plan = schedule(a.rate, a.warmup + a.duration, a.seed, a.nonstream_frac)
    mine = [(t, s) for i, (t, s) in enumerate(plan) if i % shards == index]
    start = a.start_ns or time.monotonic_ns() + 200_000_000
    rec = Recorder(start + int(a.warmup * 1e9), start + int((a.warmup + a.duration) * 1e9))
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     headers={"content-type": "application/json", "authorization": "Bearer " + a.key}) as session:
        lag = asyncio.ensure_future(watch_lag(rec, stop))

        async def sample() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.25)
                if rec.in_window(time.monotonic_ns()):
                    rec.inflight.append(len(tasks))

        sampler = asyncio.ensure_future(sample())
        shed = 0
        for t_rel, shape in mine:
            t_sched = start + int(t_rel * 1e9)
            delay = (t_sched - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= a.max_inflight:
                shed += 1
                continue
            task = asyncio.ensure_future(one(session, a.url, request_body(shape), shape, t_sched, rec, a.timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Every request scheduled in the window has had its first chunk by now; cut the rest.
        grace = (rec.t_end - time.monotonic_ns()) / 1e9 + 3.0
        if tasks and grace > 0:
            await asyncio.wait(set(tasks), timeout=grace)
        cut = len(tasks)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks), timeout=5)
        stop.set()
        await asyncio.wait({lag, sampler}, timeout=1)
    np.savez(a.out, chunk_us=np.frombuffer(rec.chunk_us, dtype=np.int64), ttft_excess_us=np.frombuffer(rec.ttft_excess_us, dtype=np.int64),
             request_leg_us=np.frombuffer(rec.request_leg_us, dtype=np.int64), whole_excess_us=np.frombuffer(rec.whole_excess_us, dtype=np.int64),
             lag_us=np.frombuffer(rec.lag_us, dtype=np.int64), inflight=np.frombuffer(rec.inflight, dtype=np.int64),
             late_start_us=np.frombuffer(rec.late_start_us, dtype=np.int64))
    return {"shard": a.shard, "scheduled": len(mine), "shed": shed, "cut_at_end": cut, "errors": rec.errors,
            "done_streams": rec.done_streams, "done_whole": rec.done_whole, "chunks_in_window": rec.chunks_total,
            "completed_in_window": rec.completed_in_window}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="open-loop LLM-shaped load generator (one shard)")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True, help="arrivals per second over all shards")
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nonstream-frac", type=float, default=0.1)
    p.add_argument("--shard", default="0/1", help="i/n: send requests whose index is i modulo n")
    p.add_argument("--start-ns", type=int, default=0, help="CLOCK_MONOTONIC ns of the schedule's time 0 (shared by all shards)")
    p.add_argument("--max-inflight", type=int, default=20_000)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request cap")
    p.add_argument("--key", default=os.environ.get("BENCH_API_KEY", "sk-bench-local"))
    p.add_argument("--out", required=True, help=".npz file for the raw samples")
    a = p.parse_args(argv)
    check_loopback(a.url)
    if not (0 < a.warmup + a.duration <= 600) or not (0 < a.rate <= 5000) or not math.isfinite(a.rate):
        raise SystemExit("bounded runs only: warmup + duration in (0, 600] s, rate in (0, 5000] /s")
    try:
        import uvloop

        out = uvloop.run(run(a))
    except ImportError:  # pragma: no cover
        out = asyncio.run(run(a))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
