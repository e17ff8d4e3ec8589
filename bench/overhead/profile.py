"""Profile a target under load with py-spy and list the hot spots.

    .venv/bin/python -m bench.overhead.profile [--target thermostat] [--concurrency 50] [--duration 10] [--stream]

Starts the fake upstream and the target (as run.py does), drives it with the load
generator (wrk if installed, else the aiohttp client) and records it twice with
py-spy: a flame graph (bench/results/profile-<target>.svg) and collapsed stacks
(bench/results/profile-<target>.txt), from which it prints the top functions by
self and inclusive share of samples, and the inclusive share of each proxy/,
policies/ and guards/ function. Needs `py-spy` in the venv (`.venv/bin/pip install py-spy`).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.overhead.run import PY, RESULTS, ROOT, build_targets, upstream_url, wait_ready

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")
OURS = ("/proxy/", "/policies/", "/guards/")


def short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def analyse(collapsed: Path, top: int = 25) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        keys = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            keys.append(f"{short(m['file'])}:{m['func']}" if m else frame)
        self_count[keys[-1]] += count
        for k in set(keys):
            incl[k] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "## Top self time (leaf frames)", "", "| % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{k}` |" for k, c in self_count.most_common(top)]
    out += ["", "## Inclusive share of Thermostat's own functions (proxy/, policies/, guards/)", "", "| % | function |", "|---:|---|"]
    ours = [(k, c) for k, c in incl.most_common() if any(k.startswith(o.strip("/") + "/") for o in OURS)]
    out += [f"| {100 * c / total:.1f} | `{k}` |" for k, c in ours[:top]]
    out += ["", "## Top inclusive (all)", "", "| % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{k}` |" for k, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="thermostat", help="thermostat | floor | litellm | thermostat-httpx")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per py-spy recording (two recordings)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--chunks", type=int, default=8, help="content chunks per streamed answer (many: profile the per-chunk relay)")
    p.add_argument("--chunk-delay-ms", type=float, default=1.0)
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 1
    ns = argparse.Namespace(upstream_delay_ms=0.0, chunks=a.chunks, chunk_delay_ms=a.chunk_delay_ms, no_litellm=a.target != "litellm")
    tmp = Path(tempfile.mkdtemp(prefix="thermostat-profile-"))
    upstream, targets = build_targets(tmp, ns)
    target = next(t for t in targets if t.name == a.target)
    if target.proc is None:
        print(f"{a.target}: {target.skipped}", file=sys.stderr)
        return 1
    procs = [upstream, target.proc]
    load = None
    try:
        for pr in procs:
            pr.start()
        for pr, url in ((upstream, upstream_url(upstream)), (target.proc, target.url)):
            err = wait_ready(pr, url, 120)
            if err:
                print(err, file=sys.stderr)
                return 1
        engine = "wrk" if shutil.which("wrk") and not a.stream else "aiohttp"
        total_s = 2 * a.duration + 4
        cmd = [PY, "-m", "bench.overhead.loadgen", "--url", target.url, "--engine", engine, "--concurrency", str(a.concurrency),
               "--duration", f"{min(total_s, 120):.0f}", "--warmup", "1"]
        if a.stream:
            cmd.append("--stream")
        load = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        RESULTS.mkdir(parents=True, exist_ok=True)
        tag = a.target + ("-stream" if a.stream else "") + f"-c{a.concurrency}" + (f"-{a.chunks}chunks" if a.chunks != 8 else "")
        svg = RESULTS / f"profile-{tag}.svg"
        raw = RESULTS / f"profile-{tag}.txt"
        # Find the process that runs the Python code (the target itself, or its worker child).
        pid = target.proc.pid
        base = [spy, "record", "--nonblocking", "--rate", str(a.rate), "--duration", f"{a.duration:.0f}", "--subprocesses", "--pid", str(pid)]
        subprocess.run([*base, "--format", "flamegraph", "-o", str(svg)], check=True, capture_output=True, timeout=a.duration + 60)
        subprocess.run([*base, "--format", "raw", "-o", str(raw)], check=True, capture_output=True, timeout=a.duration + 60)
        out, _ = load.communicate(timeout=total_s + 60)
        report = (f"# py-spy profile of {a.target} under closed loop c={a.concurrency} ({'stream' if a.stream else 'non-stream'}, {engine}"
                  f"{f', {a.chunks} chunks {a.chunk_delay_ms:g} ms apart' if a.stream else ''})\n\n")
        report += f"Load generator result: `{out.strip()[-400:]}`\n\n" + analyse(raw)
        (RESULTS / f"profile-{tag}.md").write_text(report + "\n")
        print(report)
        print(f"\nwrote {svg}, {raw}, {RESULTS / f'profile-{tag}.md'}")
        return 0
    finally:
        if load is not None and load.poll() is None:
            load.terminate()
        for pr in reversed(procs):
            pr.stop()


if __name__ == "__main__":
    sys.exit(main())
