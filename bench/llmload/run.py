"""LLM-shaped load: thousands of concurrent multi-second streams, direct vs floor vs Thermostat vs LiteLLM.

    .venv/bin/python -m bench.llmload.run              # full: steps 1,000 / 2,000 / 5,000 streams + 500 slow readers (~25 min)
    .venv/bin/python -m bench.llmload.run --smoke      # small: 100 / 200 streams, 50 slow readers (~4 min)

For each step (a target concurrency C), every target gets the same open-loop schedule:
Poisson arrivals at C / mean answer time, answers drawn from the issue's ranges (see
bench/llmload/loadgen.py), sent by several generator processes. The fake upstream
(bench/llmload/upstream.py) stamps each chunk with its send time, so "added" numbers are
ground truth: target minus direct on the same schedule. Then the slow-reader phase: the
base load plus N clients that read a few bytes per second.
Writes bench/results/llm-load-<date>[-tag].md and .json. Uses only each target's CLI
and HTTP (and Thermostat's config schema, to size its connection limits).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.llmload.loadgen import mean_duration_s, schedule
from bench.overhead.run import CLK_TCK, PY, RESULTS, ROOT, Proc, Target, build_targets, cpu_seconds, mem_kb, wait_ready

# ---- targets from the issue (2-core machine, one worker, load generator on the same cores) --------
T_ADDED_TTFT_P99_MS = 5.0
T_ADDED_CHUNK_P99_MS = 2.0
T_LOOP_LAG_P99_MS = 5.0
T_RSS_PER_STREAM_KB = 30.0
VERDICT_STEP = 2000


@dataclass
class StepResult:
    step: int
    target: str
    row: dict = field(default_factory=dict)


def pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


def ms(a: np.ndarray, q: float) -> float | None:
    v = pct(a, q)
    return None if v is None else v / 1000


def get_json(url: str, timeout: float = 5.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


LAG_LINE = re.compile(r'^thermostat_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M)


def lag_histogram(base: str) -> dict[float, float] | None:
    """Cumulative bucket counts of Thermostat's `thermostat_event_loop_lag_seconds`, or None if absent."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = {float("inf") if le == "+Inf" else float(le): float(v) for le, v in LAG_LINE.findall(text)}
    return found or None


def lag_p99_ms(before: dict[float, float] | None, after: dict[float, float] | None) -> tuple[float | None, int]:
    """Upper bound of the bucket holding the 99th percentile of the samples taken between two scrapes."""
    if not before or not after:
        return None, 0
    deltas = sorted((le, after.get(le, 0) - before.get(le, 0)) for le in after)
    total = deltas[-1][1]
    if total <= 0:
        return None, 0
    for le, cum in deltas:
        if cum >= 0.99 * total:
            return le * 1000, int(total)
    return None, int(total)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core; /proc/stat), for the share the load itself took."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenOverflows).

    A dropped SYN is retried by the client after 1 s, then 3 s, 7 s: one overflow adds seconds to
    a request's TTFT, so a run with overflows measures accept starvation, not relaying."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


def quiesce(procs: list[Proc], max_wait_s: float = 120.0, idle_cores: float = 0.05) -> float:
    """Wait until every process of the bench is idle (under `idle_cores` of CPU over a second).

    A target that fell behind keeps working through its backlog after its generators are gone
    (accepted connections, streams the upstream still sends): measured first, that work was
    charged to the next target's window. Returns the seconds waited."""
    t0 = time.monotonic()
    pids = [p.pid for p in procs if p.popen is not None and p.alive()]
    while time.monotonic() - t0 < max_wait_s:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(1.0)
        if sum(cpu_seconds(pid) for pid in pids) - before < idle_cores:
            break
    return round(time.monotonic() - t0, 1)


class Sampler(threading.Thread):
    """During one step: RSS every second, and at the window's edges CPU, lag histogram, upstream stats."""

    def __init__(self, target: Target, upstream_base: str, t_measure: float, t_end: float, probe: str | None) -> None:
        super().__init__(daemon=True)
        self.target, self.upstream_base, self.t_measure, self.t_end, self.probe = target, upstream_base, t_measure, t_end, probe
        self.rss_kb: list[int] = []
        self.probe_ms: list[float] = []
        self.cpu = (0.0, 0.0)
        self.machine = (0.0, 0.0)
        self.lag: tuple[dict | None, dict | None] = (None, None)
        self.upstream: dict | None = None
        self.pending_max = 0

    def run(self) -> None:
        pid = self.target.proc.pid  # type: ignore[union-attr]
        while time.monotonic() < self.t_measure:
            time.sleep(0.05)
        get_json(self.upstream_base + "/bench/stats?reset=1")
        cpu0 = cpu_seconds(pid)
        busy0 = machine_busy_s()
        lag0 = lag_histogram(self.target.base) if self.target.name == "thermostat" else None
        next_rss = time.monotonic()
        while time.monotonic() < self.t_end:
            now = time.monotonic()
            if now >= next_rss:
                self.rss_kb.append(mem_kb(pid, "VmRSS"))
                next_rss = now + 1.0
            if self.probe:
                t = time.perf_counter()
                try:
                    with urllib.request.urlopen(self.probe, timeout=5) as r:
                        r.read()
                    self.probe_ms.append((time.perf_counter() - t) * 1000)
                except OSError:
                    pass
            time.sleep(0.1)
        self.cpu = (cpu0, cpu_seconds(pid))
        self.machine = (busy0, machine_busy_s())
        lag1 = lag_histogram(self.target.base) if self.target.name == "thermostat" else None
        self.lag = (lag0, lag1)
        self.upstream = get_json(self.upstream_base + "/bench/stats")


def expected_concurrency(rate: float, a: argparse.Namespace, seed: int) -> float:
    """Mean number of answers in progress during the window if every target took zero time (from the schedule)."""
    plan = schedule(rate, a.warmup + a.duration, seed, a.nonstream_frac)
    starts = np.array([t for t, _ in plan])
    ends = starts + np.array([sh.seconds for _, sh in plan])
    probes = np.arange(a.warmup, a.warmup + a.duration, 0.25)
    return float(np.mean([np.count_nonzero((starts <= t) & (ends > t)) for t in probes])) if len(plan) else 0.0


def generators_for(concurrency: int, requested: int) -> int:
    return requested if requested > 0 else max(1, min(4, math.ceil(concurrency / 1000)))


def run_load(target: Target, upstream_base: str, concurrency: int, a: argparse.Namespace, tmp: Path,
             slow: int = 0) -> dict:
    """One open-loop run (plus `slow` slow readers) against one target; the merged measurements."""
    rate = concurrency / a.mean_s
    n = generators_for(concurrency, a.generators)
    overflows0 = listen_overflows()
    start_ns = time.monotonic_ns() + 1_500_000_000
    t_measure = start_ns / 1e9 + a.warmup
    t_end = t_measure + a.duration
    outs = [tmp / f"{target.name}-{concurrency}-{slow}-{i}.npz" for i in range(n)]
    procs = []
    for i in range(n):
        cmd = [PY, "-m", "bench.llmload.loadgen", "--url", target.url, "--rate", f"{rate:.4f}", "--warmup", str(a.warmup),
               "--duration", str(a.duration), "--seed", str(a.seed + concurrency), "--nonstream-frac", str(a.nonstream_frac),
               "--shard", f"{i}/{n}", "--start-ns", str(start_ns), "--out", str(outs[i])]
        if a.pin:
            cmd = ["taskset", "-c", a.pin, *cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    slow_proc = None
    if slow:
        cmd = [PY, "-m", "bench.llmload.slowread", "--url", target.url, "--clients", str(slow), "--pad", str(a.slow_pad),
               "--seconds", f"{a.warmup + a.duration + 1.5:.1f}", "--ramp", f"{min(5.0, a.warmup / 2):.1f}"]
        slow_proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    probe = target.base + "/health/liveness" if target.name == "thermostat" else None
    redis_before = redis_stats(a) if target.name == "thermostat" else None
    sampler = Sampler(target, upstream_base, t_measure, t_end, probe)
    sampler.start()
    shards, errs = [], []
    bound = a.warmup + a.duration + 30
    for p in procs:
        try:
            out, err = p.communicate(timeout=bound)
            shards.append(json.loads(out.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
            p.kill()
            errs.append(f"generator failed: {type(exc).__name__} {p.stderr.read()[-300:] if p.stderr else ''}")
    slow_out = None
    if slow_proc is not None:
        try:
            out, _ = slow_proc.communicate(timeout=bound)
            slow_out = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
            slow_proc.kill()
            slow_out = {"error": "slow readers failed"}
    sampler.join(timeout=10)
    overflows1 = listen_overflows()
    redis_after = redis_stats(a) if redis_before is not None else None
    data = {k: np.concatenate([np.load(o)[k] for o in outs if o.exists()] or [np.zeros(0, dtype=np.int64)])
            for k in ("chunk_us", "ttft_excess_us", "request_leg_us", "whole_excess_us", "lag_us", "late_start_us")}
    inflight = [np.load(o)["inflight"] for o in outs if o.exists()]
    # Concurrent requests = sum over shards of each one's in-flight count (samples line up in time).
    m = min((len(x) for x in inflight), default=0)
    held = float(np.mean(np.sum([x[:m] for x in inflight], axis=0))) if m else 0.0
    errors: dict[str, int] = {}
    for s in shards:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + v
    cpu_s = sampler.cpu[1] - sampler.cpu[0]
    chunks = sum(s["chunks_in_window"] for s in shards)
    completed = sum(s["completed_in_window"] for s in shards)
    rss_mean_kb = float(np.mean(sampler.rss_kb)) if sampler.rss_kb else None
    lag_p99, lag_samples = lag_p99_ms(*sampler.lag)
    streams_measured = len(data["ttft_excess_us"])
    row = {
        "concurrency_target": concurrency, "rate_per_s": round(rate, 2), "generators": n, "concurrency_held": round(held, 1),
        "concurrency_planned": round(expected_concurrency(rate, a, a.seed + concurrency), 1),
        "scheduled": sum(s["scheduled"] for s in shards), "errors": errors, "error_count": sum(errors.values()),
        "shed": sum(s["shed"] for s in shards), "cut_at_end": sum(s["cut_at_end"] for s in shards),
        "streams_measured": streams_measured, "whole_measured": len(data["whole_excess_us"]), "chunks_in_window": chunks,
        "completed_in_window": completed,
        "ttft_excess_p50_ms": ms(data["ttft_excess_us"], 50), "ttft_excess_p99_ms": ms(data["ttft_excess_us"], 99),
        "request_leg_p50_ms": ms(data["request_leg_us"], 50), "request_leg_p99_ms": ms(data["request_leg_us"], 99),
        "chunk_p50_ms": ms(data["chunk_us"], 50), "chunk_p99_ms": ms(data["chunk_us"], 99),
        "chunk_max_ms": float(data["chunk_us"].max()) / 1000 if len(data["chunk_us"]) else None,
        "whole_excess_p50_ms": ms(data["whole_excess_us"], 50), "whole_excess_p99_ms": ms(data["whole_excess_us"], 99),
        "gen_lag_p99_ms": ms(data["lag_us"], 99), "gen_lag_max_ms": float(data["lag_us"].max()) / 1000 if len(data["lag_us"]) else None,
        "gen_late_start_p99_ms": ms(data["late_start_us"], 99),
        "target_loop_lag_p99_ms": lag_p99, "target_loop_lag_samples": lag_samples,
        "probe_p50_ms": pct(np.array(sampler.probe_ms), 50), "probe_p99_ms": pct(np.array(sampler.probe_ms), 99),
        "upstream_late_p99_ms": (sampler.upstream or {}).get("late_p99_ms"),
        "upstream_pending_write_mb": round(((sampler.upstream or {}).get("pending_write_bytes") or 0) / 2**20, 2),
        "rss_mean_mb": round(rss_mean_kb / 1024, 1) if rss_mean_kb else None,
        "rss_max_mb": round(max(sampler.rss_kb) / 1024, 1) if sampler.rss_kb else None,
        "cpu_s": round(cpu_s, 2), "cpu_util": round(cpu_s / a.duration, 2),
        "machine_busy_cores": round((sampler.machine[1] - sampler.machine[0]) / a.duration, 2),
        "listen_overflows": None if overflows0 is None or overflows1 is None else overflows1 - overflows0,
        "cpu_us_per_chunk": round(cpu_s * 1e6 / chunks, 1) if chunks else None,
        "cpu_ms_per_request": round(cpu_s * 1e3 / completed, 2) if completed else None,
        "slow_readers": slow_out, "generator_errors": errs,
    }
    if redis_before and redis_after:
        # Whole run (warm-up included) over every request scheduled in it: background syncs are charged to requests.
        sched = max(1, row["scheduled"])
        row["redis_commands_per_request"] = round((redis_after["total_commands_processed"] - redis_before["total_commands_processed"]) / sched, 2)
        row["redis_in_bytes_per_request"] = round((redis_after["total_net_input_bytes"] - redis_before["total_net_input_bytes"]) / sched, 1)
        row["redis_out_bytes_per_request"] = round((redis_after["total_net_output_bytes"] - redis_before["total_net_output_bytes"]) / sched, 1)
    for o in outs:
        o.unlink(missing_ok=True)
    return row


def held_up(row: dict) -> tuple[bool, str]:
    """Did the target carry the step? Errors, shedding or a concurrency far below the plan say no."""
    n = max(1, row["streams_measured"] + row["whole_measured"] + row["error_count"])
    if row["generator_errors"]:
        return False, "; ".join(row["generator_errors"])
    if row["error_count"] > 0.01 * n:
        return False, f"{row['error_count']} errors of {n} requests ({row['errors']})"
    if row["concurrency_held"] < 0.8 * row["concurrency_planned"]:
        return False, f"held {row['concurrency_held']:.0f} of {row['concurrency_planned']:.0f} planned concurrent requests"
    return True, ""


def add_deltas(rows: dict[tuple[int, str], dict], idle: dict[str, float]) -> None:
    """Added = target minus direct on the same schedule; RSS per stream beyond idle."""
    for (step, name), r in rows.items():
        d = rows.get((step, "direct"))
        for key, out in (("ttft_excess_p50_ms", "added_ttft_p50_ms"), ("ttft_excess_p99_ms", "added_ttft_p99_ms"),
                         ("chunk_p99_ms", "added_chunk_p99_ms"), ("chunk_max_ms", "added_chunk_max_ms"),
                         ("whole_excess_p99_ms", "added_whole_p99_ms")):
            r[out] = (r[key] - d[key]) if d and name != "direct" and r.get(key) is not None and d.get(key) is not None else None
        prev = max((st for (st, n) in rows if n == name and st < step), default=None)
        p = rows.get((prev, name)) if prev is not None else None
        # What one more concurrent stream costs: the RSS slope from the step below. A process's
        # first load also grows it once (registry, allocator arenas, caches), which the plain
        # "beyond idle" figure charges to the streams of the first step.
        r["rss_kb_per_stream_marginal"] = (
            round((r["rss_mean_mb"] - p["rss_mean_mb"]) * 1024 / (r["concurrency_held"] - p["concurrency_held"]), 1)
            if p and r.get("rss_mean_mb") and p.get("rss_mean_mb") and r["concurrency_held"] - p["concurrency_held"] > 100 else None)
        r["rss_kb_per_stream_freed"] = (round((r["rss_mean_mb"] - r["rss_after_mb"]) * 1024 / r["concurrency_held"], 1)
                                        if r.get("rss_after_mb") and r.get("rss_mean_mb") and r["concurrency_held"] else None)
        base = idle.get(name)
        r["rss_idle_mb"] = base
        r["rss_kb_per_stream"] = (round((r["rss_mean_mb"] - base) * 1024 / r["concurrency_held"], 1)
                                  if base is not None and r["rss_mean_mb"] and r["concurrency_held"] else None)


def fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


# Without any proxy (direct), a machine that carries the step relays chunks within a few ms; beyond
# these, the generator and the upstream are themselves short of CPU or of accept slots, and a
# target's "added" delay is the difference of two starved runs (it can even come out negative).
DIRECT_CLEAN_TTFT_P99_MS = 50.0
DIRECT_CLEAN_CHUNK_P99_MS = 20.0


def machine_carries(rows: dict[tuple[int, str], dict], step: int) -> tuple[bool, str]:
    """Did the direct run (no proxy at all) stay clean at `step`? If not, no target can be judged there."""
    d = rows.get((step, "direct"))
    if d is None:
        return False, "no direct run"
    ttft, chunk = d.get("ttft_excess_p99_ms"), d.get("chunk_p99_ms")
    if ttft is None or chunk is None:
        return False, "the direct run measured nothing"
    if ttft > DIRECT_CLEAN_TTFT_P99_MS or chunk > DIRECT_CLEAN_CHUNK_P99_MS:
        return False, (f"without any proxy the generator and the upstream already took TTFT excess p99 {ttft:.0f} ms and chunk "
                       f"p99 {chunk:.0f} ms on {d.get('machine_busy_cores', '?')} busy cores")
    return True, ""


def _verdict(out: list[dict], step: int, carried: bool, why: str, name: str, value: float | None, limit: float, unit: str,
             note: str = "", needs_direct: bool = True) -> None:
    if needs_direct and not carried:
        out.append({"target": f"{name} at {step} streams", "limit": f"<= {limit:g} {unit}", "value": value, "pass": None,
                    "detail": f"n/a (measured {fmt(value)} {unit}, but {why})"})
        return
    out.append({"target": f"{name} at {step} streams", "limit": f"<= {limit:g} {unit}", "value": value,
                "pass": None if value is None else value <= limit,
                "detail": (fmt(value) + f" {unit}" if value is not None else "n/a") + note})


def verdicts(rows: dict[tuple[int, str], dict], steps: list[int]) -> list[dict]:
    """The issue's targets at the verdict step, and at the largest step this machine carries without a proxy.

    Where the direct run itself is not clean, a verdict is n/a with the reason, never a PASS
    computed from two starved runs."""
    th_steps = [s for s in steps if (s, "thermostat") in rows]
    if not th_steps:
        return []
    verdict_step = VERDICT_STEP if VERDICT_STEP in th_steps else max(th_steps)
    clean = [s for s in th_steps if machine_carries(rows, s)[0]]
    judged = sorted({verdict_step, *(clean[-1:] if clean else [])})
    out: list[dict] = []
    for step in judged:
        r = rows[(step, "thermostat")]
        carried, why = machine_carries(rows, step)

        add = functools.partial(_verdict, out, step, carried, why)
        add("added TTFT p99", r.get("added_ttft_p99_ms"), T_ADDED_TTFT_P99_MS, "ms")
        add("added inter-chunk delay p99", r.get("added_chunk_p99_ms"), T_ADDED_CHUNK_P99_MS, "ms")
        lag = r.get("target_loop_lag_p99_ms")
        add("event-loop lag p99", lag, T_LOOP_LAG_P99_MS, "ms",
            f" (bucket bound, {r['target_loop_lag_samples']} samples)" if lag is not None else
            f" (no lag histogram could be scraped; /health/liveness round trip p99 {fmt(r.get('probe_p99_ms'))} ms is an upper bound)",
            needs_direct=False)
        marginal = r.get("rss_kb_per_stream_marginal")
        add("RSS per concurrent stream beyond idle", r.get("rss_kb_per_stream"), T_RSS_PER_STREAM_KB, "KB",
            f" ({fmt(marginal, '{:.1f}')} KB per stream from the step below)" if marginal is not None else "", needs_direct=False)
    return out


def markdown(meta: dict, rows: dict[tuple[int, str], dict], steps: list[int], names: list[str], notes: list[str],
             slow: list[dict], checks: list[dict]) -> str:
    L = [f"# LLM-shaped load, {meta['date']}{' (SMOKE RUN)' if meta['smoke'] else ''}", "", f"Command: `{meta['command']}`", ""]
    L.append(
        f"Machine: {meta['cpu']} ({meta['cores']} cores), load average before / after {meta['loadavg_before']} / {meta['loadavg_after']}. "
        f"Thermostat at {meta['git']}. Load: open loop, Poisson arrivals at concurrency / {meta['mean_s']:.2f} s (mean answer time); "
        f"TTFT U(200, 800) ms, U(30, 100) tokens/s, U{{100..1000}} tokens, U{{1..5}} tokens per chunk, {meta['nonstream_frac']:.0%} non-streamed; "
        f"{meta['warmup']:g} s warm-up + {meta['duration']:g} s measured per step and target; generator processes per step: "
        f"{meta['generators']} (aiohttp on uvloop)" + (f"; generators and fake upstream pinned to CPU {meta['pin']} (taskset), targets unpinned" if meta.get("pin") else "") + "."
    )
    L += ["", "Targets: " + "; ".join(f"**{k}**: {v}" for k, v in meta["targets"].items()), ""]
    L += ["All times in ms. TTFT excess = first-chunk arrival - scheduled start - the upstream's own time; chunk = arrival - upstream send stamp; "
          "+ = minus direct on the same schedule. Loop lag: Thermostat's `thermostat_event_loop_lag_seconds` (bucket bound) / its "
          "`/health/liveness` round trip. gen lag = the load generator's own loop lag (if it is large, the generator is the bottleneck). "
          "CPU and RSS of direct are the fake upstream's; RSS/stream = (mean RSS in the window - idle RSS) / concurrency held. "
          "err = failed requests scheduled in the window; cut = requests still open when the run ended (normal: answers last up to 34 s). "
          "Machine busy = CPU the whole machine used in the window (generators, upstream and target together), in cores: near the core count, "
          "every process waits for CPU and the latency columns measure that wait. Listen overflows = connections the kernel dropped "
          "because a listen queue was full during the run (each costs its client a SYN retry of 1 s or more). Between runs every "
          "process is left to go idle first, so one target's backlog is not charged to the next.", ""]
    L.append("| step | target | held / planned | err/cut | TTFT exc p50 | p99 | +TTFT p50 | +TTFT p99 | chunk p50 | p99 | max | +chunk p99 | +chunk max | "
             "non-stream +p99 | loop lag p99 | liveness p99 | gen lag p99 | upstream late p99 | RSS MB | KB/stream | CPU % | µs/chunk | ms/req | "
             "machine busy (cores) | listen overflows | KB/stream from the step below | KB/stream freed at close |")
    L.append("|---:|---|---:|---:|" + "---:|" * 23)
    for s in steps:
        for n in names:
            r = rows.get((s, n))
            if r is None:
                continue
            L.append(
                f"| {s} | {n} | {r['concurrency_held']:.0f} / {r['concurrency_planned']:.0f} | {r['error_count']}/{r['cut_at_end']} | {fmt(r['ttft_excess_p50_ms'])} | {fmt(r['ttft_excess_p99_ms'])} | "
                f"{fmt(r['added_ttft_p50_ms'])} | {fmt(r['added_ttft_p99_ms'])} | {fmt(r['chunk_p50_ms'])} | {fmt(r['chunk_p99_ms'])} | {fmt(r['chunk_max_ms'])} | "
                f"{fmt(r['added_chunk_p99_ms'])} | {fmt(r['added_chunk_max_ms'])} | {fmt(r['added_whole_p99_ms'])} | {fmt(r['target_loop_lag_p99_ms'])} | "
                f"{fmt(r['probe_p99_ms'])} | {fmt(r['gen_lag_p99_ms'])} | {fmt(r['upstream_late_p99_ms'])} | {fmt(r['rss_mean_mb'], '{:.0f}')} | "
                f"{fmt(r['rss_kb_per_stream'], '{:.1f}')} | {fmt(r['cpu_util'] * 100, '{:.0f}')} | {fmt(r['cpu_us_per_chunk'], '{:.1f}')} | {fmt(r['cpu_ms_per_request'])} | "
                f"{fmt(r.get('machine_busy_cores'))} of {meta['cores']} | {fmt(r.get('listen_overflows'), '{:.0f}')} | "
                f"{fmt(r.get('rss_kb_per_stream_marginal'), '{:.1f}')} | {fmt(r.get('rss_kb_per_stream_freed'), '{:.1f}')} |"
            )
    if slow:
        L += ["", "## Slow readers", "",
              "Base load plus slow readers (raw sockets, SO_RCVBUF 4 KB, 16 bytes read per second, each asking for 1,000 tokens at 100 tokens/s "
              f"in 250 chunks with {meta['slow_pad']} bytes of padding each, ~{250 * (meta['slow_pad'] + 190) / 2**20:.1f} MB per slow stream). "
              "Without = the same base load alone, run just before. Slow readers and the upstream use a 1460-byte MSS, so the kernel holds "
              "~100 KB per connection (not in RSS); what a slow client has not read beyond that is either in the target's memory (RSS) or "
              "held back in the upstream's write buffers (backpressure: `held upstream`). Thermostat also keeps each answer's text for its "
              "quality signal, and the padding is answer text, so its KB per slow reader is an upper bound on relay buffering.", "",
              "| target | slow readers | base | RSS without MB | RSS with MB | KB per slow reader | held upstream MB | chunk p99 without | with | "
              "chunk max without | with | TTFT exc p99 without | with | slow readers answered / read KB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in slow:
            w, o = e["with"], e["without"]
            sr = w.get("slow_readers") or {}
            L.append(
                f"| {e['target']} | {e['clients']} | {e['base']} | {fmt(o['rss_mean_mb'], '{:.0f}')} | {fmt(w['rss_mean_mb'], '{:.0f}')} | "
                f"{fmt(e['kb_per_slow_reader'], '{:.1f}')} | {w['upstream_pending_write_mb']:.1f} | {fmt(o['chunk_p99_ms'])} | {fmt(w['chunk_p99_ms'])} | "
                f"{fmt(o['chunk_max_ms'])} | {fmt(w['chunk_max_ms'])} | {fmt(o['ttft_excess_p99_ms'])} | {fmt(w['ttft_excess_p99_ms'])} | "
                f"{sr.get('status_200', '?')} / {(sr.get('bytes_read') or 0) / 1024:.0f} |"
            )
    if checks:
        L += ["", "## Targets from the issue", "", "| target | limit | measured | result |", "|---|---|---|---|"]
        for c in checks:
            L.append(f"| {c['target']} | {c['limit']} | {c['detail']} | {'n/a' if c['pass'] is None else ('PASS' if c['pass'] else '**FAIL**')} |")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


def thermostat_limits(max_streams: int) -> tuple[str, str]:
    """Extra `[server]` / `[[upstreams]]` lines so Thermostat's own connection caps do not cut the load.

    Reads the config schema: `server.max_connections` exists only in newer versions.
    """
    import msgspec

    from proxy.config import ServerSettings, UpstreamSettings

    need = max_streams + 500
    fields = {f.name for f in msgspec.structs.fields(ServerSettings)}
    server = f"max_connections = {need}\n" if "max_connections" in fields else ""
    if "max_connections_per_client" in fields:  # the load generator is one client address
        server += f"max_connections_per_client = {need}\n"
    upstream = f"max_connections = {need}\n" if "max_connections" in {f.name for f in msgspec.structs.fields(UpstreamSettings)} else ""
    return server, upstream


def redis_stats(a: argparse.Namespace) -> dict | None:
    """Redis INFO stats when Thermostat runs with workers (meaningful on a Redis of the bench's own: nothing else counted)."""
    if a.workers <= 1:
        return None
    import redis

    try:
        return dict(redis.Redis.from_url(a.redis_url, socket_timeout=5).info("stats"))
    except redis.RedisError:
        return None


def with_workers(th: Target, tmp: Path, workers: int, redis_url: str) -> None:
    """`serve --workers N` shares its state through Redis: a key prefix of its own, so nothing else's keys are touched.

    CPU and RSS columns sum the whole process tree (the supervisor and every worker)."""
    assert th.proc is not None
    prefix = f"thermostat-bench-{os.getpid()}:"
    cfg = tmp / "thermostat.toml"
    cfg.write_text(cfg.read_text() + f'\n[storage]\nredis_url = "{redis_url}"\nredis_key_prefix = "{prefix}"\n')
    th.proc.cmd = [*th.proc.cmd, "--workers", str(workers)]
    th.note += f", `--workers {workers}` (Redis {redis_url}, key prefix {prefix})"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process started here
    return hard


def profile_thermostat(th: Target, a: argparse.Namespace, tmp: Path, upstream_base: str, step: int) -> str:
    """py-spy of Thermostat under the verdict step's load, so a missed target comes with its why."""
    from bench.overhead.profile import analyse

    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return "py-spy not installed (`.venv/bin/pip install py-spy`): no profile"
    a.results_dir.mkdir(parents=True, exist_ok=True)
    raw = a.results_dir / f"profile-llm-load-{step}.txt"
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(row=run_load(th, upstream_base, step, a, tmp)), daemon=True)
    runner.start()
    time.sleep(1.5 + a.warmup)
    subprocess.run([spy, "record", "--nonblocking", "--rate", "100", "--duration", f"{max(5, int(a.duration) - 2)}", "--format", "raw",
                    "--pid", str(th.proc.pid), "-o", str(raw)], capture_output=True, timeout=a.duration + 60)  # type: ignore[union-attr]
    runner.join(timeout=a.warmup + a.duration + 90)
    md = a.results_dir / f"profile-llm-load-{step}.md"
    md.write_text(f"# py-spy profile of Thermostat at {step} concurrent LLM-shaped streams\n\n" + analyse(raw) + "\n")
    return f"profile of Thermostat at {step} streams: {md}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="LLM-shaped load benchmark (see bench/README.md)")
    p.add_argument("--smoke", action="store_true", help="steps 100,200, 6 s warm-up + 10 s, 50 slow readers on a base of 100, no LiteLLM")
    p.add_argument("--steps", default="1000,2000,5000", help="target concurrent streams, comma-separated")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds before the window (answers last up to 34 s)")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--targets", default="direct,floor,thermostat,litellm")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--litellm-max-step", type=int, default=1000, help="LiteLLM only up to this step (it tops out far below)")
    p.add_argument("--generators", type=int, default=0, help="load generator processes (0: one per 1,000 streams, at most 4)")
    p.add_argument("--nonstream-frac", type=float, default=0.1)
    p.add_argument("--slow-readers", type=int, default=500)
    p.add_argument("--slow-pad", type=int, default=16384,
                   help="padding bytes per slow-reader chunk: 250 chunks, so ~4 MB per slow stream, past what loopback sockets hold")
    p.add_argument("--slow-base", type=int, default=1000, help="concurrent normal streams during the slow-reader phase")
    p.add_argument("--profile", action="store_true", help="py-spy Thermostat at the verdict step (needs py-spy)")
    p.add_argument("--workers", type=int, default=1,
                   help="Thermostat worker processes (`serve --workers N`); above 1 uses Redis at 127.0.0.1:6379 (--redis-url)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pin", default="", help="CPU list for the load generators and the fake upstream (taskset -c), e.g. 1; targets float")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the .md and .json go (tests use a temp dir)")
    p.add_argument("--render", type=Path, default=None, help="rewrite the .md of an earlier run's .json (verdicts recomputed); no load")
    a = p.parse_args(argv)
    if a.render is not None:
        return render(a.render)
    if a.smoke:
        a.steps, a.warmup, a.duration, a.slow_readers, a.slow_base, a.no_litellm = "100,200", 6.0, 10.0, 50, 100, True
    steps = sorted({int(x) for x in a.steps.split(",") if x})
    if not steps or max(steps) > 20_000 or a.warmup + a.duration > 300:
        raise SystemExit("bounded runs only: steps <= 20000, warm-up + duration <= 300 s")
    a.mean_s = mean_duration_s(a.nonstream_frac)
    raise_fd_limit()
    meta = run_meta(a, argv)
    tmp = Path(tempfile.mkdtemp(prefix="thermostat-llmload-"))
    server_toml, upstream_toml = thermostat_limits(max(max(steps), a.slow_base) + a.slow_readers)
    ns = argparse.Namespace(no_litellm=a.no_litellm or "litellm" not in a.targets)
    upstream_cmd = [PY, "-m", "bench.llmload.upstream"]
    if a.pin:
        upstream_cmd = ["taskset", "-c", a.pin, *upstream_cmd]
    upstream, targets = build_targets(tmp, ns, upstream_cmd=upstream_cmd, server_toml=server_toml, upstream_toml=upstream_toml)
    if a.workers > 1:
        with_workers(next(t for t in targets if t.name == "thermostat"), tmp, a.workers, a.redis_url)
    wanted = set(a.targets.split(",")) | {"direct"}
    targets = [t for t in targets if t.name in wanted]
    up_base = f"http://127.0.0.1:{upstream.port}"
    notes: list[str] = []
    started: list[Proc] = []
    rows: dict[tuple[int, str], dict] = {}
    idle: dict[str, float] = {}
    slow: list[dict] = []
    try:
        upstream.start()
        started.append(upstream)
        for t in targets:
            if t.proc is not None and t.proc is not upstream:
                t.proc.start()
                started.append(t.proc)
        for t in targets:
            if t.proc is None:
                notes.append(f"{t.name}: {t.skipped}")
                continue
            err = wait_ready(t.proc, t.url, 120 if t.name == "litellm" else 30)
            if err:
                if t.name in ("direct", "thermostat"):
                    print(err, file=sys.stderr)
                    return 1
                t.skipped = "could not start: " + " ".join(err.split())[-200:]
                notes.append(f"{t.name}: {t.skipped}")
                t.proc.stop()
        live = [t for t in targets if t.proc is not None and not t.skipped]
        time.sleep(1.0)
        for t in live:
            idle[t.name] = round(mem_kb(t.proc.pid, "VmRSS") / 1024, 1)  # type: ignore[union-attr]
        meta["targets"] = {t.name: (t.skipped or t.note.replace("the fake upstream itself", "bench/llmload/upstream.py itself")) for t in targets}
        if lag_histogram(next(t for t in live if t.name == "thermostat").base) is None:
            notes.append("Thermostat exposes no `thermostat_event_loop_lag_seconds` at this commit: loop lag column empty; "
                         "the `/health/liveness` round trip (sampled every 100 ms in the window) bounds it from above.")
        stopped: dict[str, str] = {}
        for step in steps:
            for t in live:
                if t.name in stopped or (t.name == "litellm" and step > a.litellm_max_step):
                    continue
                if not t.proc.alive():  # type: ignore[union-attr]
                    stopped[t.name] = "process died"
                    continue
                row = run_load(t, up_base, step, a, tmp)
                row["quiesce_s"] = quiesce(started)
                # Idle again, same request history: what closing the streams gave back (a Python process
                # keeps most freed memory, so this bounds RSS per stream from below; "beyond idle" from above).
                row["rss_after_mb"] = round(mem_kb(t.proc.pid, "VmRSS") / 1024, 1)  # type: ignore[union-attr]
                rows[(step, t.name)] = row
                ok, why = held_up(row)
                print(f"  step {step:>5} {t.name:<11} held {row['concurrency_held']:>7.0f}  TTFT exc p99 {fmt(row['ttft_excess_p99_ms'])}  "
                      f"chunk p99 {fmt(row['chunk_p99_ms'])} max {fmt(row['chunk_max_ms'])}  gen lag p99 {fmt(row['gen_lag_p99_ms'])}  "
                      f"RSS {fmt(row['rss_mean_mb'], '{:.0f}')} MB  err {row['error_count']}{'' if ok else '  NOT HELD: ' + why}", flush=True)
                if not ok:
                    stopped[t.name] = f"did not hold {step} streams: {why}"
                    notes.append(f"{t.name} {stopped[t.name]}; higher steps skipped")
        if a.slow_readers:
            for t in live:
                if t.name not in ("floor", "thermostat") or not t.proc.alive():  # type: ignore[union-attr]
                    continue
                # A fresh run right before, not the step's: a Python process's RSS rarely shrinks, so order matters.
                without = run_load(t, up_base, a.slow_base, a, tmp)
                quiesce(started)
                with_slow = run_load(t, up_base, a.slow_base, a, tmp, slow=a.slow_readers)
                quiesce(started)
                kb = ((with_slow["rss_mean_mb"] - without["rss_mean_mb"]) * 1024 / a.slow_readers
                      if with_slow["rss_mean_mb"] and without["rss_mean_mb"] else None)
                slow.append({"target": t.name, "clients": a.slow_readers, "base": a.slow_base, "with": with_slow, "without": without,
                             "kb_per_slow_reader": kb})
                print(f"  slow readers {t.name:<11} RSS {fmt(without['rss_mean_mb'], '{:.0f}')} -> {fmt(with_slow['rss_mean_mb'], '{:.0f}')} MB  "
                      f"held upstream {with_slow['upstream_pending_write_mb']:.1f} MB  chunk p99 {fmt(without['chunk_p99_ms'])} -> "
                      f"{fmt(with_slow['chunk_p99_ms'])}  slow: {with_slow.get('slow_readers')}", flush=True)
        add_deltas(rows, idle)
        for (step, name), row in sorted(rows.items()):
            if "redis_commands_per_request" in row:
                notes.append(f"Redis ({a.redis_url}) at step {step}, {name}: {row['redis_commands_per_request']} commands, "
                             f"{row['redis_in_bytes_per_request']} bytes in and {row['redis_out_bytes_per_request']} bytes out per "
                             "scheduled request (INFO stats over the whole run, warm-up included).")
        if a.profile:
            th = next(t for t in live if t.name == "thermostat")
            th_steps = [s for s in steps if (s, "thermostat") in rows]
            notes.append(profile_thermostat(th, a, tmp, up_base, VERDICT_STEP if VERDICT_STEP in th_steps else max(th_steps)))
        slow_to_idle = [f"{n} at {st} ({r['quiesce_s']:.0f} s)" for (st, n), r in sorted(rows.items()) if r.get("quiesce_s", 0) >= 119]
        if slow_to_idle:
            notes.append("Still busy 2 minutes after its run (a backlog of connections whose clients had gone): " + ", ".join(slow_to_idle)
                         + "; the next run's numbers carry some of that work.")
        gen_lag = [r["gen_lag_p99_ms"] for r in rows.values() if r.get("gen_lag_p99_ms") is not None]
        if gen_lag and max(gen_lag) > 5:
            notes.append(f"The load generator's own loop lag reached p99 {max(gen_lag):.1f} ms: at that point chunk and TTFT numbers include "
                         "client-side queueing (direct carries it too, so the + columns subtract most of it). More `--generators` only help with spare cores.")
        meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        checks = verdicts(rows, steps)
        names = [t.name for t in targets]
        md = markdown(meta, rows, steps, names, notes, slow, checks)
        a.results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"llm-load-{dt.date.today().isoformat()}" + ("-smoke" if a.smoke else "") + (f"-{a.tag}" if a.tag else "")
        (a.results_dir / f"{stem}.md").write_text(md)
        payload = {"meta": meta, "steps": steps, "rows": [{"step": s, "target": n, **r} for (s, n), r in rows.items()],
                   "slow_readers": slow, "checks": checks, "notes": notes}
        (a.results_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
        print()
        print(md)
        print(f"wrote {a.results_dir / stem}.md and .json")
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()


def render(path: Path) -> int:
    """The report of a saved run, with today's verdict rules: the .json keeps every measured row."""
    payload = json.loads(path.read_text())
    rows = {(r["step"], r["target"]): r for r in payload["rows"]}
    steps = payload["steps"]
    names = list(dict.fromkeys(r["target"] for r in payload["rows"]))
    payload["checks"] = verdicts(rows, steps)
    path.write_text(json.dumps(payload, indent=2, default=str))
    md = markdown(payload["meta"], rows, steps, names, payload["notes"], payload["slow_readers"], payload["checks"])
    path.with_suffix(".md").write_text(md)
    print(f"rewrote {path.with_suffix('.md')}")
    return 0


def run_meta(a: argparse.Namespace, argv: list[str]) -> dict:
    from bench.overhead.run import machine_meta

    base = machine_meta(argparse.Namespace(engine="aiohttp", reps=1, warmup=a.warmup, duration=a.duration, upstream_delay_ms=0,
                                           chunks=0, chunk_delay_ms=0), [])
    return {
        "date": base["date"], "command": " ".join([".venv/bin/python -m bench.llmload.run", *argv]), "cpu": base["cpu"], "cores": base["cores"],
        "loadavg_before": base["loadavg_before"], "python": base["python"], "git": base["git"], "smoke": a.smoke,
        "warmup": a.warmup, "duration": a.duration, "mean_s": a.mean_s, "nonstream_frac": a.nonstream_frac,
        "generators": a.generators or "one per 1,000 streams (1-4)", "pin": a.pin, "seed": a.seed, "slow_pad": a.slow_pad, "workers": a.workers,
    }


if __name__ == "__main__":
    sys.exit(main())
