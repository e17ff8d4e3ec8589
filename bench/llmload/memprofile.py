"""What one concurrent stream holds in Thermostat: tracemalloc, grouped by where it was allocated.

    .venv/bin/python -m bench.llmload.memprofile --streams 300

Runs the real app in this process (tracemalloc on, uvloop off so the traces are Python's),
the LLM-shaped fake upstream and a plain aiohttp client in subprocesses (so their memory
is not in the traces). It opens `--streams` long streams, waits until they are all
relaying, and diffs a snapshot against the idle one: bytes per stream by the innermost
frame, and by the innermost frame inside Thermostat's own code. Writes
bench/results/llm-memprofile-<date>[-tag].md. RSS per stream is not measured here
(tracemalloc itself costs memory); bench.llmload.run measures that.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.overhead.run import PY, RESULTS, ROOT, free_port

CLIENT = r"""
import asyncio, sys, aiohttp
async def one(s, url, i):
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"bench ttft_ms=200 tps=30 tokens=1000 chunk=3 #{i}"}]}
    async with s.post(url, json=body) as r:
        async for _ in r.content.iter_any():
            pass
async def main(url, n):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)) as s:
        await asyncio.gather(*(one(s, url, i) for i in range(n)), return_exceptions=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _where(stat: tracemalloc.Statistic, own: bool) -> str:
    frames = list(reversed(stat.traceback))  # tracemalloc keeps the oldest first
    if own:
        for fr in frames:
            if fr.filename.startswith(str(ROOT)) and "/site-packages/" not in fr.filename and "/tests/" not in fr.filename:
                return f"{os.path.relpath(fr.filename, ROOT)}:{fr.lineno}"
        return "(outside Thermostat)"
    fr = frames[0]
    name = fr.filename.split("/site-packages/")[-1] if "/site-packages/" in fr.filename else os.path.relpath(fr.filename, ROOT)
    return f"{name}:{fr.lineno}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--settle", type=float, default=12.0, help="seconds after the last stream started before the snapshot")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)

    from proxy.config import build_config
    from tests.support.servers import start_thermostat

    tmp = Path(tempfile.mkdtemp(prefix="thermostat-memprof-"))
    up_port = free_port()
    upstream = subprocess.Popen([PY, "-m", "bench.llmload.upstream", "--port", str(up_port)], cwd=ROOT)
    client: subprocess.Popen[bytes] | None = None
    try:
        time.sleep(1.0)
        cfg = build_config({
            "server": {"data_dir": str(tmp), "max_connections": a.streams + 100, "max_connections_per_client": a.streams + 100},
            "upstreams": [{"name": "fake", "base_url": f"http://127.0.0.1:{up_port}/v1", "models": ["*"], "max_connections": a.streams + 100}],
            "optimization": {"enabled": True, "mode": "general", "policy": "thompson_gaussian"},
            "admin": {"allow_unauthenticated": True},
        }, environ={})
        tracemalloc.start(12)
        th = start_thermostat(cfg)
        # Warm every lazy path (pools, metric children, policy tables) before the idle snapshot.
        warm = subprocess.run([PY, "-c", CLIENT.replace("tokens=1000", "tokens=20"), f"{th.url}/chat/completions", "20"], cwd=ROOT, timeout=60)
        assert warm.returncode == 0
        th.flush(0.3)

        async def collect() -> None:
            gc.collect()

        th.call(collect(), timeout=120)
        idle = tracemalloc.take_snapshot()
        client = subprocess.Popen([PY, "-c", CLIENT, f"{th.url}/chat/completions", str(a.streams)], cwd=ROOT)
        time.sleep(a.settle)
        loaded = tracemalloc.take_snapshot()
        open_conns = len(th.server.server_state.connections)
        th.stop()
    finally:
        if client is not None:
            client.kill()
        upstream.kill()

    flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    idle, loaded = idle.filter_traces(flt), loaded.filter_traces(flt)
    n = max(1, open_conns - 1)
    total = sum(s.size_diff for s in loaded.compare_to(idle, "filename"))
    lines = [f"# What one stream holds in Thermostat (tracemalloc), {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"Command: `.venv/bin/python -m bench.llmload.memprofile {' '.join(argv or sys.argv[1:])}`", "",
             f"{a.streams} streams asked for (TTFT 200 ms, 30 tokens/s, 1,000 tokens, 3 tokens per chunk), {n} connections open at the "
             f"snapshot, {a.settle:g} s after they started. Load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
             f"Python-heap growth over idle: **{total / n / 1024:.1f} KB per stream** (tracemalloc sees Python allocations only: "
             "not the kernel's socket buffers, not uvloop's C buffers, not allocator slack, so RSS per stream is higher).", ""]
    for title, own in (("innermost frame", False), ("innermost frame in Thermostat's own code", True)):
        grouped: dict[str, int] = {}
        for stat in loaded.compare_to(idle, "traceback"):
            key = _where(stat, own)
            grouped[key] = grouped.get(key, 0) + stat.size_diff
        lines += [f"## By {title}", "", "| where | bytes per stream |", "|---|---:|"]
        for key, size in sorted(grouped.items(), key=lambda kv: -kv[1])[: a.top]:
            lines.append(f"| `{key}` | {size / n:,.0f} |")
        lines.append("")
    md = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"llm-memprofile-{dt.date.today().isoformat()}" + (f"-{a.tag}" if a.tag else "") + ".md")
    out.write_text(md)
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
