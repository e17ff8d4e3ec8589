"""How stale the learnt tables get when learning runs in batches (proxy/decision/batch.py), and the CPU per request.

    .venv/bin/python -m bench.overhead.learning_batches --requests 20000 --concurrency 50 --upstream-ms 5
    .venv/bin/python -m bench.overhead.learning_batches --ref 77d9b62     # the same on another commit (no batches before)

The whole edge runs in this process (one ASGI call per request, no socket) in front of an
in-memory upstream that answers after `--upstream-ms`; `--concurrency` clients keep
requests in flight. Reported per batch (the decider's: policy updates and length
evidence; the conservative monitor's): how many ran, their mean and largest size, and the
longest any outcome waited for its batch, which is how far behind the tables the decision
path reads can be (plus, for the policy's propensity tables, the refresher's 50 ms).
The CPU per request is this process's user + system time over the window (socket and HTTP
parsing excluded, the journal's writes included, unlike callgrind's user-space count), so
it moves with the machine's load: compare commits side by side (`--ref`, run alternately).
Appends a row to bench/results/learning-batches-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from multidict import CIMultiDict

from bench.overhead.run import RESULTS, ROOT
from proxy.app import create_app
from proxy.config import build_config
from proxy.runtime import Runtime
from tests.support.memory_transport import CannedResponse, MemoryTransport, chat_json

HEADER = ("# Learning in batches: batch sizes and staleness under closed-loop load\n\n"
          "Command: `.venv/bin/python -m bench.overhead.learning_batches --requests N --concurrency C --upstream-ms U` "
          "(the edge in-process, an in-memory upstream answering after U ms). Max wait: the longest an outcome waited "
          "for its batch (bound: 50 ms or 512 outcomes, plus loop lag).\n\n"
          "| when (UTC) | commit | requests | concurrency | upstream ms | req/s | CPU µs / request | batch | batches | mean size | max size | max wait ms | load average |\n"
          "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|\n")


class SlowTransport(MemoryTransport):
    """The in-memory upstream, answering after a delay (so requests overlap as they would on a socket)."""

    def __init__(self, delay_s: float) -> None:
        body = chat_json("Hello there, this is an answer.", completion_tokens=40)
        super().__init__(lambda req: CannedResponse(200, [body]))
        self.delay_s = delay_s

    async def send(self, method: str, url: str, headers: CIMultiDict[str], body: bytes | None) -> CannedResponse:
        await asyncio.sleep(self.delay_s)
        answer = await super().send(method, url, headers, body)
        self.requests.clear()
        self.responses.clear()
        return answer


REQUEST = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "Hi."}], "temperature": 0.7, "max_tokens": 256})
SCOPE: dict[str, Any] = {
    "type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", str(len(REQUEST)).encode())],
}


async def one(app: Any) -> None:
    status: list[int] = []
    messages = [{"type": "http.request", "body": REQUEST, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(dict(SCOPE), receive, send)
    if status != [200]:
        raise SystemExit(f"request failed: {status}")


async def run(a: argparse.Namespace) -> list[str]:
    os.environ.setdefault("BENCH_UPSTREAM_KEY", "sk-bench")
    cfg = build_config({
        "server": {"data_dir": tempfile.mkdtemp(prefix="thermostat-batches-")},
        "upstreams": [{"name": "mem", "base_url": "http://upstream.invalid/v1", "models": ["*"], "api_key_env": "BENCH_UPSTREAM_KEY"}],
        "admin": {"allow_unauthenticated": True},
        "optimization": {"enabled": True, "mode": "general", "policy": "thompson_gaussian"},
    }, environ={})
    rt = Runtime(cfg, transport=SlowTransport(a.upstream_ms / 1000))
    app = create_app(cfg, rt)
    await rt.start()
    try:
        for _ in range(200):
            await one(app)
        # Before batches existed (--ref of an older commit) there is nothing to report but the CPU.
        found = {"decider": getattr(rt.bandit, "learning", None), "conservative": getattr(rt.conservative_listener, "batch", None)}
        batches = {name: b for name, b in found.items() if b is not None}
        for b in batches.values():
            b.drain()
            b.batches = b.outcomes = b.max_size = 0
            b.max_age_s = 0.0
        left = a.requests

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(app)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client() for _ in range(a.concurrency)))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await rt.stop()
    rev = a.ref or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    head = (f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} | {rev} | {a.requests} | {a.concurrency} | {a.upstream_ms:g} | "
            f"{a.requests / seconds:,.0f} | {cpu / a.requests * 1e6:.0f} |")
    if not batches:
        return [f"{head} none | | | | | {load} |"]
    rows = []
    for name, b in batches.items():
        mean = b.outcomes / b.batches if b.batches else 0.0
        rows.append(f"{head} {name} | {b.batches} | {mean:.1f} | {b.max_size} | {b.max_age_s * 1000:.1f} | {load} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--upstream-ms", type=float, default=5.0)
    p.add_argument("--ref", default="", help="a commit to measure instead of this checkout (a temporary git worktree)")
    p.add_argument("--out", default="", help="the results file (default bench/results/learning-batches-<date>.md)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run for --ref, inside its worktree
    a = p.parse_args(argv)
    path = Path(a.out) if a.out else RESULTS / f"learning-batches-{dt.date.today().isoformat()}.md"
    if a.ref and not a.child:
        src = Path(tempfile.mkdtemp(prefix="thermostat-batches-src-")) / "src"
        subprocess.run(["git", "worktree", "add", "--detach", str(src), a.ref], cwd=ROOT, check=True, capture_output=True)
        try:
            args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--out" and x != a.out]
            env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
            # This file, run with the other commit's packages first (its bench and tests folders, too).
            return subprocess.run([sys.executable, __file__, *args, "--out", str(path), "--child"], cwd=src, env=env).returncode
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, capture_output=True)
    logging.disable(logging.WARNING)
    rows = asyncio.run(run(a))
    if not path.exists():
        path.write_text(HEADER)
    with path.open("a") as fh:
        for row in rows:
            fh.write(row + "\n")
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
