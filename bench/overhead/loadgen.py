"""Load generator for the overhead benchmark; run as its own process, prints one JSON object.

Two engines, the same numbers out:
  * `aiohttp` (default): asyncio + uvloop, one ClientSession with connection reuse.
    Closed loop (`--concurrency N` workers, each sends the next request when the last
    one finished) or open loop (`--rate R` req/s on a fixed schedule; latency is
    measured from the *scheduled* start, so a stalled target is not flattered by
    coordinated omission; at most `--max-inflight` outstanding, the rest are counted as
    `shed`). Non-streaming or streaming (`--stream`: TTFT = first body chunk, and total).
  * `wrk` (closed loop, non-streaming only): the C load generator, when installed; it
    costs far less CPU per request than any Python client, which matters on 2 cores.
    Its warm-up is a separate wrk process, so the measured run opens fresh connections:
    fine at c <= 100, but at c=500 the connect storm (SYN retransmits on loopback) puts
    1-3 s into p99, so run.py uses the aiohttp engine above c=100.

Bounded: `--warmup` + `--duration` seconds, plus at most `--timeout` for stragglers.
Loopback only: the URL must be on 127.0.0.0/8 or localhost.

    python -m bench.overhead.loadgen --url http://127.0.0.1:9100/v1/chat/completions --concurrency 50 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

MODEL = "fake-model"


def request_body(stream: bool) -> bytes:
    doc: dict = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in five words."},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
    }
    if stream:
        doc["stream"] = True
        doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc, separators=(",", ":")).encode()


# A local-only key (run.py makes a random one per run and passes it as BENCH_API_KEY): LiteLLM
# refuses to start without a strong master key, and every target gets the same header.
BENCH_KEY = os.environ.get("BENCH_API_KEY") or "sk-bench-local"
HEADERS = {"content-type": "application/json", "authorization": "Bearer " + BENCH_KEY}


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise SystemExit(f"refusing non-loopback target {host!r}")


def pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def summarize(lat: list[float], ttft: list[float], overhead: list[float], errors: dict[str, int], window: float, shed: int = 0) -> dict:
    lat.sort()
    ttft.sort()
    overhead.sort()
    n = len(lat)
    out = {
        "ok": n,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "shed": shed,
        "window_s": round(window, 3),
        "rps": round(n / window, 1) if window > 0 else 0.0,
        "lat_p50_ms": pct(lat, 50),
        "lat_p90_ms": pct(lat, 90),
        "lat_p99_ms": pct(lat, 99),
        "lat_max_ms": lat[-1] if lat else None,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "hdr_overhead_p50_ms": pct(overhead, 50),
        "hdr_overhead_p99_ms": pct(overhead, 99),
    }
    return out


# ---- aiohttp engine ---------------------------------------------------------------


async def run_aiohttp(a: argparse.Namespace) -> dict:
    import aiohttp

    body = request_body(a.stream)
    url = a.url
    lat: list[float] = []
    ttfts: list[float] = []
    overhead: list[float] = []
    errors: dict[str, int] = {}
    total = [0]  # every successful response, warmup included (CPU per request divides by this)
    limit = a.concurrency if a.rate is None else a.max_inflight
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=None, force_close=False)
    timeout = aiohttp.ClientTimeout(total=a.timeout)
    perf = time.perf_counter
    t_start = perf()
    t_measure = t_start + a.warmup
    t_end = t_measure + a.duration

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False, headers=HEADERS) as session:

        async def one(t_sched: float) -> None:
            first: float | None = None
            try:
                async with session.post(url, data=body) as resp:
                    if a.stream:
                        async for chunk in resp.content.iter_any():
                            if first is None and chunk:
                                first = perf()
                    else:
                        await resp.read()
                    status = resp.status
                    hdr = resp.headers.get("x-thermostat-overhead-ms")
            except TimeoutError:
                t_done = perf()
                if t_measure <= t_done <= t_end + a.timeout:
                    errors["timeout"] = errors.get("timeout", 0) + 1
                return
            except Exception as exc:  # noqa: BLE001 - a load generator counts, it does not crash
                t_done = perf()
                if t_measure <= t_done:
                    k = type(exc).__name__
                    errors[k] = errors.get(k, 0) + 1
                return
            t_done = perf()
            if status == 200:
                total[0] += 1
            if t_done < t_measure or t_done > t_end:
                return
            if status != 200:
                errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1
                return
            lat.append((t_done - t_sched) * 1000)
            if first is not None:
                ttfts.append((first - t_sched) * 1000)
            if hdr is not None:
                try:
                    overhead.append(float(hdr))
                except ValueError:
                    pass

        shed = 0
        if a.rate is None:

            budget = [a.requests if a.requests else -1]

            async def worker() -> None:
                while perf() < t_end and budget[0] != 0:
                    budget[0] -= 1
                    await one(perf())

            await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        else:
            interval = 1.0 / a.rate
            inflight: set[asyncio.Task] = set()
            i = 0
            while True:
                t_sched = t_start + i * interval
                if t_sched >= t_end:
                    break
                now = perf()
                if t_sched > now:
                    await asyncio.sleep(t_sched - now)
                if len(inflight) >= a.max_inflight:
                    if t_sched >= t_measure:
                        shed += 1
                else:
                    task = asyncio.ensure_future(one(t_sched))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                i += 1
            if inflight:
                await asyncio.wait(inflight, timeout=a.timeout)
    window = min(a.duration, max(0.0, perf() - t_measure))
    out = summarize(lat, ttfts, overhead, errors, window, shed)
    out["total_ok"] = total[0]
    return out


# ---- wrk engine -------------------------------------------------------------------

WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [==[%BODY%]==]
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer %KEY%"
local non200 = 0
response = function(status, headers, body)
  if status ~= 200 then non200 = non200 + 1 end
end
done = function(summary, latency, requests)
  local s = summary
  local e = s.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    s.requests, s.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def run_wrk(a: argparse.Namespace) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed")
    if a.stream or a.rate is not None:
        raise SystemExit("the wrk engine does closed-loop non-streaming only")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA.replace("%BODY%", request_body(False).decode()).replace("%KEY%", BENCH_KEY))
        script = f.name
    try:
        base = [wrk, "-t1", f"-c{a.concurrency}", "-s", script, "--timeout", f"{int(a.timeout)}s", a.url]
        warm_requests = 0
        if a.warmup > 0:
            warm = subprocess.run([*base[:1], "-t1", f"-c{a.concurrency}", f"-d{max(1, int(round(a.warmup)))}s", *base[3:]], capture_output=True, text=True, timeout=a.warmup + a.timeout + 10)
            wm = re.search(r"WRKJSON (\{.*\})", warm.stdout)
            warm_requests = json.loads(wm.group(1))["requests"] if wm else 0
        proc = subprocess.run(
            [*base[:1], "-t1", f"-c{a.concurrency}", f"-d{max(1, int(round(a.duration)))}s", *base[3:]],
            capture_output=True, text=True, timeout=a.duration + a.timeout + 10,
        )
    finally:
        os.unlink(script)
    m = re.search(r"WRKJSON (\{.*\})", proc.stdout)
    if not m:
        raise SystemExit(f"wrk gave no result: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    w = json.loads(m.group(1))
    window = w["duration_us"] / 1e6
    errors = {k: w[k] for k in ("connect", "read", "write", "timeout") if w[k]}
    if w["status"]:
        errors["non_200"] = w["status"]
    n_ok = w["requests"] - w["status"]
    return {
        "ok": n_ok,
        "total_ok": n_ok + warm_requests,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "shed": 0,
        "window_s": round(window, 3),
        "rps": round(n_ok / window, 1) if window else 0.0,
        "lat_p50_ms": w["p50"] / 1000 if n_ok else None,
        "lat_p90_ms": w["p90"] / 1000 if n_ok else None,
        "lat_p99_ms": w["p99"] / 1000 if n_ok else None,
        "lat_max_ms": w["max"] / 1000 if n_ok else None,
        "ttft_p50_ms": None,
        "ttft_p99_ms": None,
        "hdr_overhead_p50_ms": None,
        "hdr_overhead_p99_ms": None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="closed/open-loop load generator (prints JSON)")
    p.add_argument("--url", required=True)
    p.add_argument("--engine", choices=["aiohttp", "wrk"], default="aiohttp")
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: workers")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    p.add_argument("--max-inflight", type=int, default=1000, help="open loop: outstanding cap")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=0, help="closed loop: stop after this many requests (0 = time only)")
    a = p.parse_args(argv)
    check_loopback(a.url)
    if not (0 < a.duration <= 120):
        raise SystemExit("--duration must be in (0, 120] seconds")
    if a.engine == "wrk":
        out = run_wrk(a)
    else:
        try:
            import uvloop

            out = uvloop.run(run_aiohttp(a))
        except ImportError:  # pragma: no cover
            out = asyncio.run(run_aiohttp(a))
    out.update(engine=a.engine, concurrency=a.concurrency if a.rate is None else None, rate=a.rate, stream=a.stream)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
