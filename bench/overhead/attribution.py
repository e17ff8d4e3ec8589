"""Where a request's CPU goes, by room: the in-process edge under cProfile, grouped by package.

    .venv/bin/python -m bench.overhead.attribution --requests 3000                 # the default config
    .venv/bin/python -m bench.overhead.attribution --requests 3000 --variant bare  # everything a config can switch off, off

Why a second measurement beside callgrind's: callgrind counts a request's instructions
exactly but sees only C functions (the interpreter's loop, not which Python function it
runs); `bench.overhead.callgrind --variants` measures what each switchable part costs by
switching it off. What no setting switches off is attributed here, by self time of every
function, summed per room (`proxy/edge`, `proxy/decision`, `guards`, `policies`, ...),
third-party package and C built-in. cProfile adds a fixed cost to every call it sees, so
rooms made of many small calls look larger than they are: read the shares as a ranking,
not as microseconds. The profiler's clock is this process's CPU time, so a loaded machine
does not charge other processes' time to whatever function was running.

Same harness as bench/overhead/learning_batches.py (one ASGI call per request, an
in-memory upstream answering after 2 ms, 50 clients). Appends a table to
bench/results/cpu-attribution-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import datetime as dt
import logging
import os
import pstats
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import learning_batches as harness
from bench.overhead.run import RESULTS, ROOT
from proxy.app import create_app
from proxy.config import build_config
from proxy.runtime import Runtime

# The same switches as bench.overhead.callgrind.VARIANTS, as the raw config build_config reads.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "bare": {"optimization": {"enabled": False}, "storage": {"journal": False, "state_persist": False}, "caws": {"enabled": False}},
}
ROOMS = ("proxy", "guards", "policies", "bench", "tests")


def room_of(filename: str, function: str) -> str:
    """The room (first two path parts under the repo), the third-party package, the stdlib module or `C built-ins`."""
    path = filename.replace(os.sep, "/")
    if "site-packages/" in path:
        return "lib " + path.split("site-packages/", 1)[1].split("/", 1)[0]
    root = str(ROOT).replace(os.sep, "/") + "/"
    if path.startswith(root) or "/proxy/" in path or "/guards/" in path or "/policies/" in path:
        rel = path[len(root):] if path.startswith(root) else path[path.find("/", 1) + 1:]
        parts = rel.split("/")
        for i, part in enumerate(parts):
            if part in ROOMS:
                rest = parts[i:]
                return "/".join(rest[:2]) if rest[0] == "proxy" and len(rest) > 2 else rest[0] + ("/" + rest[1] if len(rest) > 1 else "")
        return rel
    if filename.startswith(("~", "<")):
        return "C built-ins"
    return "stdlib " + Path(filename).stem


# The edge's pipeline steps (proxy/edge/asgi.py), whose inclusive time splits a request into
# before forwarding (admit, decide, prepare), on the wire (exchange: send and relay) and after (finish).
STEPS = ("_admit", "_decide", "_prepare", "_exchange", "_finish")


async def profile(variant: str, requests: int, concurrency: int) -> tuple[collections.Counter[str], float, float, dict[str, float]]:
    os.environ.setdefault("BENCH_UPSTREAM_KEY", "sk-bench")
    raw: dict[str, Any] = {
        "server": {"data_dir": tempfile.mkdtemp(prefix="thermostat-attribution-")},
        "upstreams": [{"name": "mem", "base_url": "http://upstream.invalid/v1", "models": ["*"], "api_key_env": "BENCH_UPSTREAM_KEY"}],
        "admin": {"allow_unauthenticated": True},
        "optimization": {"enabled": True, "mode": "general", "policy": "thompson_gaussian"},
        **VARIANTS[variant],
    }
    cfg = build_config(raw, environ={})
    rt = Runtime(cfg, transport=harness.SlowTransport(0.002))
    app = create_app(cfg, rt)
    await rt.start()
    try:
        for _ in range(300):
            await harness.one(app)
        left = requests

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await harness.one(app)

        c0 = time.process_time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        cpu_plain = time.process_time() - c0
        left = requests
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        await asyncio.sleep(0.2)  # the last batch of outcomes is learnt and written inside the window
        prof.disable()
    finally:
        await rt.stop()
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    groups: collections.Counter[str] = collections.Counter()
    steps: dict[str, float] = {}
    for (filename, _line, function), (_cc, _nc, tottime, cumtime, _callers) in stats.items():
        groups[room_of(filename, function)] += tottime
        if function in STEPS and filename.endswith("asgi.py"):
            steps[function] = steps.get(function, 0.0) + cumtime
    return groups, cpu_plain, sum(groups.values()), steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    p.add_argument("--top", type=int, default=20)
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    groups, cpu_plain, profiled, steps = asyncio.run(profile(a.variant, a.requests, a.concurrency))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {rev}, variant `{a.variant}`\n",
             f"`.venv/bin/python -m bench.overhead.attribution --requests {a.requests} --variant {a.variant}`; "
             f"CPU per request without the profiler {cpu_plain / a.requests * 1e6:.0f} µs (in-process, no sockets); "
             f"load average {load}.\n",
             "| share of profiled self time | room, package or module |", "|---:|---|"]
    for name, seconds in groups.most_common(a.top):
        lines.append(f"| {seconds / profiled * 100:.1f} % | `{name}` |")
    rest = profiled - sum(s for _, s in groups.most_common(a.top))
    lines.append(f"| {rest / profiled * 100:.1f} % | everything else ({max(0, len(groups) - a.top)} more) |")
    lines += ["", "Inclusive time of the edge's steps, as a share of all profiled time (the rest: the server loop, "
              "the client harness, background batches and writers):", "", "| step | share |", "|---|---:|"]
    lines += [f"| `{name}` | {steps.get(name, 0.0) / profiled * 100:.1f} % |" for name in STEPS]
    path = RESULTS / f"cpu-attribution-{dt.date.today().isoformat()}.md"
    if not path.exists():
        path.write_text("# Where a request's CPU goes, by room (cProfile self time, in-process)\n\n"
                        "See bench/overhead/attribution.py for how to read it: shares rank the rooms; cProfile's per-call cost "
                        "inflates rooms made of many small calls.\n")
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
