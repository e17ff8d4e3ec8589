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

    .venv/bin/python -m bench.overhead.callgrind --requests 400 --variants full,no-journal,no-budget,no-optimization,bare

`--variants` measures the same build with parts switched off in its config (`VARIANTS`), one
window each: the difference to `full` is what that part costs per request, measured rather
than read off a profiler (whose own overhead is largest on the many small calls of the hot path).
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.overhead.loadgen import HEADERS, request_body
from bench.overhead.run import PY, RESULTS, ROOT, free_port


async def drive(url: str, n: int, concurrency: int, stream_only: bool = False) -> int:
    ok = 0
    sem = asyncio.Semaphore(concurrency)
    bodies = (request_body(True),) if stream_only else (request_body(False), request_body(True))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def one(i: int) -> None:
            nonlocal ok
            async with sem, s.post(url, data=bodies[i % len(bodies)], headers=HEADERS) as r:
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


# Config variants for `--variants`: what each switches off, as TOML appended to the bench's config.
# `bare` is everything a config can switch off at once: what remains is the edge itself
# (parse, route, relay), the decision log's row and the metrics, which no setting removes.
VARIANTS: dict[str, str] = {
    "full": "",
    "no-journal": "[storage]\njournal = false\n",
    "no-state": "[storage]\nstate_persist = false\n",
    "no-budget": "[caws]\nenabled = false\n",
    "no-optimization": "[optimization]\nenabled = false\n",
    "bare": "[storage]\njournal = false\nstate_persist = false\n[caws]\nenabled = false\n[optimization]\nenabled = false\n",
}


def thermostat_toml(data_dir: Path, up_port: int, variant: str = "full") -> str:
    """The bench's config; a variant's sections replace the defaults' (one [optimization] table either way)."""
    extra = VARIANTS[variant]
    optimization = "" if "[optimization]" in extra else '[optimization]\nenabled = true\nmode = "general"\npolicy = "thompson_gaussian"\n'
    return (f'[server]\ndata_dir = "{data_dir}"\n[[upstreams]]\nname = "fake"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
            f'models = ["*"]\n{optimization}[admin]\nallow_unauthenticated = true\n{extra}')


@dataclass(frozen=True)
class Window:
    """One callgrind window: its instructions over the requests it counted."""

    target: str
    rev: str
    chunks: int
    requests: int
    instructions: int
    seconds: float = 0.0  # wall time of the request window
    idle_instructions: int = 0  # the same process with no request, over idle_seconds
    idle_seconds: float = 0.0

    @property
    def idle_rate(self) -> float:
        """Instructions per second the process spends with no request at all (its periodic loops and threads)."""
        return self.idle_instructions / self.idle_seconds if self.idle_seconds else 0.0

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def measure(a: argparse.Namespace, target: str, chunks: int, stream_only: bool, variant: str = "full") -> Window | None:
    """Start the fake upstream and `target` under callgrind, count the window of `a.requests`."""
    tmp = Path(tempfile.mkdtemp(prefix="thermostat-callgrind-"))
    env = dict(os.environ)
    src = ROOT
    if a.ref and target == "thermostat":
        src = tmp / "src"
        subprocess.run(["git", "worktree", "add", "--detach", str(src), a.ref], cwd=ROOT, check=True, capture_output=True)
        env["PYTHONPATH"] = str(src)
    rev = subprocess.run(["git", "rev-parse", "--short", a.ref or "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = "" if a.ref or not subprocess.run(["git", "status", "--porcelain", "proxy", "policies", "guards"], cwd=ROOT,
                                                capture_output=True, text=True).stdout.strip() else "+dirty"
    up_port, port = free_port(), free_port()
    (tmp / "data").mkdir()
    out = tmp / "callgrind.out"
    upstream = subprocess.Popen([PY, "-m", "bench.overhead.fake_upstream", "--port", str(up_port), "--chunks", str(chunks),
                                 "--chunk-delay-ms", str(a.chunk_delay_ms)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if target in ("floor", "floor-asgi"):
        module = "bench.overhead.floor" if target == "floor" else "bench.overhead.floor_asgi"
        cmd = [PY, "-m", module, "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}"]
        ready = f"http://127.0.0.1:{port}/health"  # forwarded to the fake upstream's own /health
    else:
        cfg = tmp / "thermostat.toml"
        cfg.write_text(thermostat_toml(tmp / "data", up_port, variant))
        cmd = [PY, "-m", "proxy.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
        ready = f"http://127.0.0.1:{port}/health/liveness"
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *cmd],
                              cwd=src, env=env, stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(ready, 600)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(drive(url, a.warmup, a.concurrency, stream_only))
        time.sleep(2)
        control = ["callgrind_control", str(server.pid)]
        subprocess.run([*control[:1], "-i", "on", *control[1:]], check=True, capture_output=True)
        idle_s = a.idle_s
        if idle_s > 0:  # the idle window: dumped on its own (a dump zeroes the counters)
            time.sleep(idle_s)
            subprocess.run([*control[:1], "-d", "idle", *control[1:]], check=True, capture_output=True)
        t_start = time.perf_counter()
        ok = asyncio.run(drive(url, a.requests, a.concurrency, stream_only))
        seconds = time.perf_counter() - t_start
        subprocess.run([*control[:1], "-d", "requests", *control[1:]], check=True, capture_output=True)
        subprocess.run([*control[:1], "-i", "off", *control[1:]], check=True, capture_output=True)
    finally:
        server.terminate()
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
        upstream.terminate()
        if src != ROOT:
            subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT, capture_output=True)
    totals = {"idle": 0, "requests": 0}
    for f in tmp.glob("callgrind.out*"):
        text = f.read_text(errors="replace")
        m = re.search(r"^totals: (\d+)", text, re.M) or re.search(r"^summary: (\d+)", text, re.M)
        trigger = re.search(r"^desc: Trigger: (?:Client Request: |dump )(\w+)", text, re.M)
        if m and trigger and trigger[1] in totals:
            totals[trigger[1]] += int(m[1])
    if not totals["requests"] or ok != a.requests:
        print(f"no counts or failed requests ({ok}/{a.requests}); see {tmp}", file=sys.stderr)
        return None
    if a.keep:
        print(f"callgrind files kept in {tmp} (callgrind_annotate {tmp}/callgrind.out.2)", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return Window(target, rev + dirty if target == "thermostat" else "-", chunks, a.requests, totals["requests"], seconds,
                  totals["idle"], idle_s)


def per_chunk(low: Window, high: Window) -> tuple[float, float]:
    """Instructions per relayed chunk (the slope between two chunk counts) and per request (the intercept).

    Longer answers keep the window open longer, so the process's idle work (periodic loops,
    threads) grows with the chunk count too: it is taken out at the rate the idle window measured.
    """
    def busy(w: Window) -> float:
        return (w.instructions - w.idle_rate * w.seconds) / w.requests

    slope = (busy(high) - busy(low)) / (high.chunks - low.chunks)
    return slope, busy(low) - slope * low.chunks


HEADER = ("# Instructions per request through Thermostat (valgrind callgrind)\n\n"
          "Command: `.venv/bin/python -m bench.overhead.callgrind --requests N [--ref COMMIT] [--label L]` "
          "(half streamed, half not; bench/overhead/fake_upstream.py, 8 chunks), or with `--per-chunk A,B [--targets floor,thermostat]`: "
          "streamed requests only, at A and then B chunks per answer; the slope between the two is the CPU each relayed chunk "
          "costs, the intercept what a request costs apart from its chunks. Instruction counts do not depend on the machine's "
          "load, which is recorded only for the record.\n\n"
          "| when (UTC) | target | commit | change | requests | concurrency | chunks | M instructions / request | load average |\n"
          "|---|---|---|---|---:|---:|---:|---:|---|\n")


def write_row(line: str) -> None:
    path = RESULTS / f"callgrind-{dt.date.today().isoformat()}.md"
    if not path.exists():
        path.write_text(HEADER)
    with path.open("a") as fh:
        fh.write(line + "\n")
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--ref", default="", help="a commit to measure instead of this checkout")
    p.add_argument("--label", default="")
    p.add_argument("--targets", default="thermostat", help="thermostat, floor (bench/overhead/floor.py: aiohttp server) and/or floor-asgi (floor_asgi.py: uvicorn), comma-separated")
    p.add_argument("--per-chunk", default="", help="A,B: streamed requests only, at A then B chunks each; reports the slope")
    p.add_argument("--keep", action="store_true", help="keep the callgrind files (for callgrind_annotate)")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds of no load counted first, for the idle rate")
    p.add_argument("--variants", default="", help=f"thermostat only, one window per config variant: {', '.join(VARIANTS)}")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0,
                   help="gap between upstream chunks; with --per-chunk make it long enough that chunks are not coalesced")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.per_chunk.split(",")] if a.per_chunk else [8]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if a.variants:
        return run_variants(a, [v.strip() for v in a.variants.split(",")], load)
    for target in a.targets.split(","):
        windows = []
        for chunks in counts:
            w = measure(a, target, chunks, stream_only=bool(a.per_chunk))
            if w is None:
                return 1
            windows.append(w)
            # The window's periodic work grows with its wall time, which a loaded machine stretches: also shown without it.
            busy = (w.instructions - w.idle_rate * w.seconds) / w.requests
            write_row(f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} | {target} | {w.rev} | {a.label} | {a.requests} | "
                      f"{a.concurrency} | {chunks if a.per_chunk else '8 (half streamed)'} | {w.per_request / 1e6:.3f} "
                      f"({busy / 1e6:.3f} without idle work, {w.seconds:.0f} s window) | {load} |")
        if len(windows) == 2:
            slope, base = per_chunk(windows[0], windows[1])
            idle = sum(w.idle_rate for w in windows) / len(windows)
            write_row(f"| | {target} | {windows[0].rev} | {a.label} | per chunk: **{slope / 1e3:.1f} k** instructions; "
                      f"per request apart from chunks: **{base / 1e6:.3f} M**; idle: {idle / 1e6:.2f} M/s, taken out | | | | |")
    return 0


def run_variants(a: argparse.Namespace, variants: list[str], load: str) -> int:
    """One window per config variant; each row also says how far it is below `full` (when `full` ran first)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    base: float | None = None
    for variant in variants:
        w = measure(a, "thermostat", 8, stream_only=False, variant=variant)
        if w is None:
            return 1
        busy = (w.instructions - w.idle_rate * w.seconds) / w.requests
        if variant == "full":
            base = busy
        saved = f"; {(base - busy) / 1e6:.3f} M less than full" if base is not None and variant != "full" else ""
        write_row(f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} | thermostat | {w.rev} | variant {variant} {a.label} | {a.requests} | "
                  f"{a.concurrency} | 8 (half streamed) | {w.per_request / 1e6:.3f} ({busy / 1e6:.3f} without idle work{saved}) | {load} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
