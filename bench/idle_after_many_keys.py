"""Idle cost of a proxy after many distinct task types (hardening issue, "idle stays idle").

Command: `.venv/bin/python bench/idle_after_many_keys.py [--tasks 10000] [--code DIR] [--label NAME]`
Starts `thermostat serve` (general mode, Thompson, Redis replica sync on 127.0.0.1:6379) in
front of the fake upstream, measures its idle CPU over 6 s, sends `--tasks` requests each
with its own `x-task-type`, waits 3 s, measures idle CPU again, and reports RSS, event-loop
lag (when the code exports it) and what Redis holds. `--code DIR` runs the server from
another checkout (PYTHONPATH), e.g. the commit before the change, for a before/after row.
Appends one row to bench/results/idle-after-many-keys.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.idle import IDLE_WINDOW_S, cpu_seconds, distinct_task_types, idle_window  # noqa: E402
from tests.support.servers import free_port, wait_ready  # noqa: E402

REDIS_URL = os.environ.get("THERMOSTAT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RESULTS = ROOT / "bench" / "results" / "idle-after-many-keys.md"
HEADER = """# Idle cost after many distinct task types

`bench/idle_after_many_keys.py`: one `thermostat serve` process (general mode, Thompson, Redis sync
every 1 s): idle CPU over a {window:g} s window before, and again from 3 s after, N requests that each carry
their own `x-task-type`. CPU is the server's own (utime + stime from /proc), as a share of one core. Loop lag:
samples of `thermostat_event_loop_lag_seconds` later than 100 ms / all samples in the idle window.
The machine is a shared 2-core VM (load average in the row), so the burst duration is only indicative.

| date | code | tasks | burst s | server CPU s in burst | idle CPU before | idle CPU after | late loop samples after | RSS after MB | Redis policy fields | policy TTL | load avg |
|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def idle(base: str, pid: int) -> tuple[float, str]:
    try:
        cpu, samples, late = idle_window(base, pid)
        return cpu, f"{late}/{samples}"
    except KeyError:  # code without the loop-lag metric
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(IDLE_WINDOW_S)
        return (cpu_seconds(pid) - c0) / (time.monotonic() - t0), "n/a"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout the server runs from")
    ap.add_argument("--label", default="this branch")
    args = ap.parse_args()
    prefix = f"bench-idle:{uuid.uuid4().hex[:8]}:"
    up = FakeUpstream().start()
    tmp = Path(tempfile.mkdtemp(prefix="idle-bench-"))
    cfg = tmp / "t.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "{tmp / "data"}"\n\n[[upstreams]]\nname = "fake"\nbase_url = "{up.url}"\nmodels = ["*"]\n\n'
        f'[storage]\nredis_url = "{REDIS_URL}"\nredis_key_prefix = "{prefix}"\n\n'
        '[optimization]\nmode = "general"\npolicy = "thompson_gaussian"\nseed = 1\n\n[caws]\nbudget_limit = 1000000000\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PYTHONPATH"] = str(args.code.resolve())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("thermostat")
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log, stderr=log, env=env)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wait_ready(f"{base}/health", proc)
        time.sleep(1.5)
        before, _ = idle(base, proc.pid)
        t0, c0 = time.monotonic(), cpu_seconds(proc.pid)
        statuses = asyncio.run(distinct_task_types(f"{base}/v1", args.tasks))
        burst_s, burst_cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - c0
        ok = statuses.count(200)
        time.sleep(3.0)
        after, late = idle(base, proc.pid)
        rss_mb = int(Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        policy_keys = [k for k in client.scan_iter(match=f"{prefix}policy:*") if not k.endswith(b":changes")]
        fields = sum(client.hlen(k) for k in policy_keys)
        ttl = client.pttl(policy_keys[0]) if policy_keys else -2
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
        up.stop()
    ttl_text = "none" if ttl == -1 else f"{ttl / 86_400_000:.0f} d"
    row = (
        f"| {dt.date.today().isoformat()} | {args.label} | {args.tasks} ({ok} ok) | {burst_s:.0f} | {burst_cpu:.1f} | {before:.1%} | {after:.1%} "
        f"| {late} | {rss_mb:.0f} | {fields} | {ttl_text} | {os.getloadavg()[0]:.1f} |\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(HEADER.format(window=IDLE_WINDOW_S))
    with RESULTS.open("a") as out:
        out.write(row)
    print(row, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
