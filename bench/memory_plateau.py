"""Does Thermostat's memory plateau under steady load? RSS over time, and what grows (issue 26, item 5).

    .venv/bin/python -m bench.memory_plateau --minutes 30 --rate 100               # RSS only (the plateau claim)
    .venv/bin/python -m bench.memory_plateau --minutes 8 --rate 100 --tracemalloc 8  # what grows, by allocation site

Runs the real `thermostat serve` (a subprocess, one worker, SQLite log, crash journal, the
judge played by the simulator) in front of the repo's simulator (`thermostat simulate`,
another subprocess) and drives it open loop from this process: Poisson arrivals at
`--rate` requests/s, `--stream-share` of them streamed (with `include_usage`), over four
task types and `--users` assignment keys; `--feedback-share` of the answers get explicit
feedback posted to `record-outcome` and `--regenerate-share` are asked again by the same
user (a regeneration mark). Every `--sample-s` seconds it reads the server's RSS from
/proc. With `--tracemalloc N` the server runs under a bench-only hook (this module's
`hooked` entry point: `tracemalloc.start(N)` before the app is imported, a snapshot
written on SIGUSR1), never in production code, and the report lists the allocation sites
whose traced size grew most between the first snapshot after warm-up and each later one.
tracemalloc costs CPU and memory of its own, so its run's RSS is not the plateau claim:
run the two modes separately.

Writes bench/results/memory-plateau-<date>[-tag].md and .json. Everything is on
127.0.0.1 and every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tests.support.servers import wait_ready

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
ENV_FRAMES = "THERMOSTAT_BENCH_TRACEMALLOC"  # frames per trace; read only by `hooked` below
ENV_SNAPSHOTS = "THERMOSTAT_BENCH_SNAPSHOTS"  # folder the hook writes snapshot-<n>.pickle into
TASKS = (
    ("code", "You are a senior Python developer.", 0.7),
    ("creative", "You write short fiction and poems.", 0.8),
    ("summarise", "Summarise the user's text in three sentences.", 0.7),
    ("chat", "You are a helpful assistant.", 0.5),
)


def hooked(argv: list[str]) -> int:
    """`thermostat` with tracemalloc on and a snapshot on SIGUSR1 (bench only: the production entry point has neither)."""
    tracemalloc.start(int(os.environ[ENV_FRAMES]))
    folder = Path(os.environ[ENV_SNAPSHOTS])
    taken = [0]

    def snapshot(signum: int, frame: object) -> None:
        snap = tracemalloc.take_snapshot().filter_traces((
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        ))
        tmp = folder / f".snapshot-{taken[0]}.pickle"
        snap.dump(str(tmp))
        tmp.rename(folder / f"snapshot-{taken[0]}.pickle")  # whole files only: the bench waits for the name
        taken[0] += 1

    signal.signal(signal.SIGUSR1, snapshot)
    from proxy.cli import main as cli_main

    return cli_main(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def write_config(path: Path, data_dir: Path, sim_url: str) -> None:
    path.write_text(f"""
[server]
data_dir = "{data_dir}"
workers = 1
max_connections_per_client = 0  # the load generator is one client address with up to --max-in-flight connections

[[upstreams]]
name = "simulator"
base_url = "{sim_url}"
models = ["*"]

[optimization]
mode = "general"

[caws]
budget_limit = 100000000000

[slo]
latency_p99_ms = 60000  # the simulator's own latency is not what this measures: no rollback to the short path

[judge]
enabled = true
model = "sim-judge"

[admin]
allow_unauthenticated = true
""")


class Load:
    """Open-loop traffic and what came of it."""

    def __init__(self, base: str, a: argparse.Namespace) -> None:
        self.base = base
        self.a = a
        self.rng = random.Random(a.seed)
        self.sent = self.ok = self.errors = self.streamed = self.feedback = self.regenerated = 0
        self.statuses: dict[str, int] = {}  # non-200 answers by status, and exceptions by type
        self.late = 0.0  # the largest lag of the schedule behind its due time, seconds
        self.in_flight: set[asyncio.Task[None]] = set()

    async def run(self, until: float) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=self.a.max_in_flight, limit_per_host=self.a.max_in_flight)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            due = loop.time()
            i = 0
            while loop.time() < until:
                if len(self.in_flight) < self.a.max_in_flight:
                    task = asyncio.create_task(self.one(session, i))
                    self.in_flight.add(task)
                    task.add_done_callback(self.in_flight.discard)
                    self.sent += 1
                i += 1
                due += self.rng.expovariate(self.a.rate)
                self.late = max(self.late, loop.time() - due)
                await asyncio.sleep(max(0.0, due - loop.time()))
            await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def one(self, session: Any, i: int) -> None:
        task, system, temperature = TASKS[i % len(TASKS)]
        user = f"user-{self.rng.randrange(self.a.users)}"
        stream = self.rng.random() < self.a.stream_share
        body: dict[str, Any] = {
            "model": "sim-1",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"request {i}: {self.rng.random():.6f}"}],
            "temperature": temperature,
            "max_tokens": 400,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"x-task-type": task, "x-thermostat-key": user}
        feedback = self.rng.random() < self.a.feedback_share
        again = self.rng.random() < self.a.regenerate_share
        try:
            for attempt in range(2 if again else 1):
                async with session.post(f"{self.base}/v1/chat/completions", json=body, headers=headers) as r:
                    async for _ in r.content.iter_any():
                        pass
                    if r.status != 200:
                        self.errors += 1
                        self.statuses[str(r.status)] = self.statuses.get(str(r.status), 0) + 1
                        return
                    self.ok += 1
                    self.streamed += stream
                    self.regenerated += attempt
                    request_id = r.headers.get("x-request-id")
                    quality = r.headers.get("x-sim-quality")
                if feedback and attempt == 0 and request_id and quality is not None:
                    async with session.post(f"{self.base}/api/optimization/record-outcome",
                                            json={"request_id": request_id, "outcome": {"quality": float(quality)}}) as fr:
                        await fr.read()
                        self.feedback += fr.status == 200
        except Exception as exc:  # noqa: BLE001  (counted, the load goes on)
            self.errors += 1
            self.statuses[type(exc).__name__] = self.statuses.get(type(exc).__name__, 0) + 1
            if self.errors <= 5:
                print(f"request error: {exc!r}", file=sys.stderr, flush=True)


def site(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    name = name.split("/site-packages/")[-1] if "/site-packages/" in name else os.path.relpath(name, ROOT)
    return f"{name}:{frame.lineno}"


def own_site(tb: tracemalloc.Traceback) -> str:
    """The innermost frame inside Thermostat's own code (what holds the memory), else the innermost frame."""
    for fr in reversed(list(tb)):  # tracemalloc keeps the oldest frame first
        if fr.filename.startswith(str(ROOT)) and "/site-packages/" not in fr.filename and "/bench/" not in fr.filename:
            return site(fr)
    return site(tb[-1])


def growth(first: Path, later: Path, top: int) -> dict[str, Any]:
    """Traced bytes by allocation site (innermost frame, and innermost frame in Thermostat's code): later minus first."""
    a, b = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(later))
    by_line = b.compare_to(a, "lineno")
    own: dict[str, list[int]] = {}
    for stat in b.compare_to(a, "traceback"):
        entry = own.setdefault(own_site(stat.traceback), [0, 0, 0])
        entry[0] += stat.size_diff
        entry[1] += stat.count_diff
        entry[2] += stat.size
    total_a = sum(s.size for s in a.statistics("filename"))
    total_b = sum(s.size for s in b.statistics("filename"))
    return {
        "traced_mb": [round(total_a / 2**20, 2), round(total_b / 2**20, 2)],
        "by_line": [{"site": site(s.traceback[0]), "kb_diff": round(s.size_diff / 1024, 1), "count_diff": s.count_diff,
                     "kb": round(s.size / 1024, 1)} for s in by_line[:top]],
        "by_own_site": [{"site": k, "kb_diff": round(v[0] / 1024, 1), "count_diff": v[1], "kb": round(v[2] / 1024, 1)}
                        for k, v in sorted(own.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) in MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mm = sum(m for _, m in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (m - mm) for t, m in points) / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second, Poisson arrivals")
    p.add_argument("--stream-share", type=float, default=0.3)
    p.add_argument("--feedback-share", type=float, default=0.1, help="answers whose simulator score is posted as explicit feedback")
    p.add_argument("--regenerate-share", type=float, default=0.05, help="requests a user sends again (a regeneration mark)")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--time-scale", type=float, default=0.1, help="simulator latency scale (0.1: answers in ~0.1-0.5 s)")
    p.add_argument("--max-in-flight", type=int, default=512)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="excluded from the slope; the first snapshot is taken here")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="run the server under tracemalloc (0 = off)")
    p.add_argument("--snapshot-every-s", type=float, default=120.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="thermostat-memplateau-"))
    sim_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    procs: list[subprocess.Popen[bytes]] = []
    snapshots = tmp / "snapshots"
    try:
        sim = subprocess.Popen([PY, "-m", "proxy.cli", "simulate", "--port", str(sim_port), "--time-scale", str(a.time_scale)],
                               cwd=ROOT, env=env, stdout=open(tmp / "simulator.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(sim)
        cfg = tmp / "config.toml"
        write_config(cfg, tmp / "data", f"http://127.0.0.1:{sim_port}/v1")
        serve = ["serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
        if a.tracemalloc:
            snapshots.mkdir()
            env = {**env, ENV_FRAMES: str(a.tracemalloc), ENV_SNAPSHOTS: str(snapshots)}
            cmd = [PY, "-c", "import sys; from bench.memory_plateau import hooked; sys.exit(hooked(sys.argv[1:]))", *serve]
        else:
            cmd = [PY, "-m", "proxy.cli", *serve]
        th = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp / "thermostat.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(th)
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"http://127.0.0.1:{sim_port}/v1/models", sim)
        wait_ready(f"{base}/health/readiness", th, timeout=600 if a.tracemalloc else 90)  # tracemalloc slows start-up many times
        time.sleep(2.0)
        idle_kb = rss_kb(th.pid)
        started_at = dt.datetime.now(dt.UTC)
        print(f"memory_plateau: thermostat pid {th.pid}, idle RSS {idle_kb / 1024:.1f} MB; {a.rate:g} req/s for {a.minutes:g} min "
              f"({'tracemalloc ' + str(a.tracemalloc) + ' frames' if a.tracemalloc else 'no tracemalloc'})", flush=True)
        load = Load(base, a)
        samples: list[dict[str, Any]] = []
        snaps: list[tuple[float, Path]] = []

        async def sampler(t0: float, until: float) -> None:
            loop = asyncio.get_running_loop()
            next_snap = t0 + a.warmup_s
            while loop.time() < until:
                await asyncio.sleep(a.sample_s)
                t = loop.time() - t0
                kb = rss_kb(th.pid)
                samples.append({"t_s": round(t, 1), "rss_mb": round(kb / 1024, 1), "ok": load.ok, "errors": load.errors,
                                "in_flight": len(load.in_flight)})
                if len(samples) % max(1, int(60 / a.sample_s)) == 0:
                    print(f"  {t / 60:5.1f} min  RSS {kb / 1024:6.1f} MB  answered {load.ok:,}  errors {load.errors}  "
                          f"in flight {len(load.in_flight)}", flush=True)
                if a.tracemalloc and loop.time() >= next_snap:
                    n = len(snaps)
                    th.send_signal(signal.SIGUSR1)
                    target = snapshots / f"snapshot-{n}.pickle"
                    while not target.exists() and th.poll() is None:
                        await asyncio.sleep(0.2)
                    snaps.append((t, target))
                    next_snap += a.snapshot_every_s

        async def drive() -> None:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            until = t0 + a.minutes * 60
            await asyncio.gather(load.run(until), sampler(t0, until))

        interrupted = False
        try:
            asyncio.run(drive())
        except KeyboardInterrupt:  # Ctrl-C: stop the load, still report what was measured
            interrupted = True
        time.sleep(a.sample_s)
        after_kb = rss_kb(th.pid)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    steady = [(s["t_s"], s["rss_mb"]) for s in samples if s["t_s"] >= a.warmup_s]
    last_third = [pt for pt in steady if pt[0] >= samples[-1]["t_s"] * 2 / 3] if samples else []
    result: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "args": vars(a),
        "idle_rss_mb": round(idle_kb / 1024, 1),
        "after_load_rss_mb": round(after_kb / 1024, 1),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},  # glibc tunables the server inherited
        "interrupted": interrupted,
        "answered": load.ok, "errors": load.errors, "error_kinds": load.statuses, "streamed": load.streamed, "feedback_posted": load.feedback,
        "regenerations": load.regenerated, "sent": load.sent, "schedule_late_max_s": round(load.late, 3),
        "slope_after_warmup_mb_per_min": round(slope_mb_per_min(steady), 3),
        "slope_last_third_mb_per_min": round(slope_mb_per_min(last_third), 3),
        "last_third_range_mb": [min((m for _, m in last_third), default=0), max((m for _, m in last_third), default=0)],
        "samples": samples,
        "growth": [],
    }
    if len(snaps) >= 2:
        first_t, first = snaps[0]
        for t, later in snaps[1:]:
            result["growth"].append({"from_s": round(first_t), "to_s": round(t), **growth(first, later, a.top)})
    day = started_at.date().isoformat()
    stem = f"memory-plateau-{day}{'-' + a.tag if a.tag else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{stem}.md").write_text(report(result, argv if argv is not None else sys.argv[1:]))
    print(f"memory_plateau: wrote {RESULTS / stem}.md / .json", flush=True)
    return 0


def report(r: dict[str, Any], argv: list[str]) -> str:
    a = r["args"]
    lines = [
        f"# Memory under steady load, {r['started_at']}",
        "",
        f"`.venv/bin/python -m bench.memory_plateau {' '.join(argv)}`",
        "",
        f"One `thermostat serve` worker (SQLite log, crash journal, judge = the simulator's `sim-judge`, mode general) in front of "
        f"`thermostat simulate --time-scale {a['time_scale']}`; open loop, Poisson {a['rate']:g} req/s for {a['minutes']:g} min, "
        f"{a['stream_share']:.0%} streamed, explicit feedback on {a['feedback_share']:.0%}, {a['regenerate_share']:.0%} asked again, "
        f"{a['users']} users, 4 task types. "
        + ("**tracemalloc on** (" + str(a["tracemalloc"]) + " frames): RSS here includes tracemalloc's own memory and is not the plateau claim."
           if a["tracemalloc"] else "No tracemalloc."),
        "",
        *(["- **interrupted** before the planned end (Ctrl-C)"] if r.get("interrupted") else []),
        *([f"- glibc tunables in the environment: {r['malloc_env']}"] if r.get("malloc_env") else []),
        f"- answered {r['answered']:,} ({r['streamed']:,} streamed), errors {r['errors']} {r.get('error_kinds') or ''}, feedback posted {r['feedback_posted']:,}, "
        f"regenerations {r['regenerations']:,}; the schedule ran at most {r['schedule_late_max_s']} s late",
        f"- RSS idle {r['idle_rss_mb']} MB, after the load {r['after_load_rss_mb']} MB",
        f"- slope after the {a['warmup_s']:g} s warm-up: {r['slope_after_warmup_mb_per_min']} MB/min; over the last third: "
        f"{r['slope_last_third_mb_per_min']} MB/min (range {r['last_third_range_mb'][0]}-{r['last_third_range_mb'][1]} MB)",
        "",
        "| minute | RSS MB | answered | errors | in flight |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    step = max(1, int(60 / a["sample_s"]))
    shown = r["samples"][step - 1 :: step]
    for s in shown:
        lines.append(f"| {s['t_s'] / 60:.0f} | {s['rss_mb']} | {s['ok']:,} | {s['errors']} | {s['in_flight']} |")
    for g in r["growth"]:
        lines += [
            "",
            f"## tracemalloc: growth from {g['from_s']} s to {g['to_s']} s (traced {g['traced_mb'][0]} → {g['traced_mb'][1]} MB)",
            "",
            "By the innermost frame inside Thermostat's code (who holds it):",
            "",
            "| site | KB grown | blocks grown | KB at the end |",
            "| --- | ---: | ---: | ---: |",
            *(f"| `{x['site']}` | {x['kb_diff']:,} | {x['count_diff']:,} | {x['kb']:,} |" for x in g["by_own_site"]),
            "",
            "By the innermost frame (what allocated it):",
            "",
            "| site | KB grown | blocks grown | KB at the end |",
            "| --- | ---: | ---: | ---: |",
            *(f"| `{x['site']}` | {x['kb_diff']:,} | {x['count_diff']:,} | {x['kb']:,} |" for x in g["by_line"]),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
