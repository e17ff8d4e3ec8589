"""CPU per request as instructions (valgrind callgrind): repeatable on a loaded machine, unlike req/s.

    .venv/bin/python -m bench.overhead.callgrind --requests 400                  # this checkout
    .venv/bin/python -m bench.overhead.callgrind --requests 400 --ref e6278d0    # another commit, same measurement

`thermostat serve` runs under callgrind with instrumentation off; once it answers, a warm-up
runs uninstrumented, then `callgrind_control -i on` counts exactly the window in which
`--requests` requests (half streamed, half not, `--concurrency` at a time) go through it to
bench/overhead/fake_upstream.py. Instructions / request is that window's total over the
request count (whatever the loop does meanwhile, periodic work included, is charged to the
requests, as on a busy server). `--ref` runs the same server code from a temporary
`git worktree` of that commit (PYTHONPATH first, so the editable install is shadowed).
Appends a row to bench/results/callgrind-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.overhead.loadgen import HEADERS, request_body
from bench.overhead.run import PY, RESULTS, ROOT, free_port


async def drive(url: str, n: int, concurrency: int) -> int:
    ok = 0
    sem = asyncio.Semaphore(concurrency)
    bodies = (request_body(False), request_body(True))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def one(i: int) -> None:
            nonlocal ok
            async with sem, s.post(url, data=bodies[i % 2], headers=HEADERS) as r:
                await r.read()
                ok += r.status == 200

        await asyncio.gather(*(one(i) for i in range(n)))
    return ok


def wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--ref", default="", help="a commit to measure instead of this checkout")
    p.add_argument("--label", default="")
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="thermostat-callgrind-"))
    env = dict(os.environ)
    src = ROOT
    if a.ref:
        src = tmp / "src"
        subprocess.run(["git", "worktree", "add", "--detach", str(src), a.ref], cwd=ROOT, check=True, capture_output=True)
        env["PYTHONPATH"] = str(src)
    rev = subprocess.run(["git", "rev-parse", "--short", a.ref or "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = "" if a.ref or not subprocess.run(["git", "status", "--porcelain", "proxy", "policies", "guards"], cwd=ROOT,
                                                capture_output=True, text=True).stdout.strip() else "+dirty"
    up_port, port = free_port(), free_port()
    (tmp / "data").mkdir()
    cfg = tmp / "thermostat.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp / "data"}"\n[[upstreams]]\nname = "fake"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
                   'models = ["*"]\n[optimization]\nenabled = true\nmode = "general"\npolicy = "thompson_gaussian"\n'
                   "[admin]\nallow_unauthenticated = true\n")
    out = tmp / "callgrind.out"
    upstream = subprocess.Popen([PY, "-m", "bench.overhead.fake_upstream", "--port", str(up_port)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               PY, "-m", "proxy.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                              cwd=src, env=env, stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveness", 600)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(drive(url, a.warmup, a.concurrency))
        time.sleep(2)
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
        ok = asyncio.run(drive(url, a.requests, a.concurrency))
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
    finally:
        server.terminate()
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
        upstream.terminate()
        if a.ref:
            subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, capture_output=True)
    total = 0
    for f in tmp.glob("callgrind.out*"):
        m = re.search(r"^totals: (\d+)", f.read_text(errors="replace"), re.M)
        total += int(m[1]) if m else 0
    if not total or ok != a.requests:
        print(f"no counts or failed requests ({ok}/{a.requests}); see {tmp}", file=sys.stderr)
        return 1
    per = total / a.requests
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    row = f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} | {rev}{dirty} | {a.label} | {a.requests} | {a.concurrency} | {per / 1e6:.3f} | {load} |"
    path = RESULTS / f"callgrind-{dt.date.today().isoformat()}.md"
    if not path.exists():
        path.write_text("# Instructions per request through Thermostat (valgrind callgrind)\n\n"
                        "Command: `.venv/bin/python -m bench.overhead.callgrind --requests N [--ref COMMIT] [--label L]` "
                        "(half streamed, half not; bench/overhead/fake_upstream.py, 8 chunks). Instruction counts do not "
                        "depend on the machine's load, which is recorded only for the record.\n\n"
                        "| when (UTC) | commit | change | requests | concurrency | M instructions / request | load average |\n"
                        "|---|---|---|---:|---:|---:|---|\n")
    with path.open("a") as fh:
        fh.write(row + "\n")
    print(row)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
