"""Idle-cost probes for a running Thermostat process: its CPU time, its event-loop lag
histogram, and a burst of requests each with its own task type (tests and bench/)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import aiohttp
import httpx

IDLE_WINDOW_S = 6.0
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def lag_histogram(base: str) -> dict[float, float]:
    """Cumulative counts of `thermostat_event_loop_lag_seconds` by upper bound."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    out: dict[float, float] = {}
    for le, count in re.findall(r'thermostat_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', text):
        out[float(le)] = float(count)
    return out


def idle_window(base: str, pid: int) -> tuple[float, int, int]:
    """(CPU share of one core, loop-lag samples, samples later than 100 ms) over an idle window."""
    lag0, cpu0, t0 = lag_histogram(base), cpu_seconds(pid), time.monotonic()
    time.sleep(IDLE_WINDOW_S)
    cpu1, t1, lag1 = cpu_seconds(pid), time.monotonic(), lag_histogram(base)
    samples = int(lag1[float("inf")] - lag0[float("inf")])
    late = samples - int(lag1[0.1] - lag0[0.1])
    return (cpu1 - cpu0) / (t1 - t0), samples, late


async def distinct_task_types(url: str, n: int, concurrency: int = 32) -> list[int]:
    """`n` requests, each with its own task type (aiohttp: the client shares this process
    with the fake upstream, and httpx would make the client the bottleneck)."""
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "temperature": 0.5}
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

        async def worker(start: int) -> None:
            for i in range(start, n, concurrency):
                async with session.post(f"{url}/chat/completions", json=body, headers={"x-task-type": f"task-{i}"}) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return statuses
