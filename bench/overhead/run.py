"""Overhead benchmark: direct vs bare floor vs Thermostat vs LiteLLM, interleaved.

    .venv/bin/python -m bench.overhead.run            # full run (~10-12 min)
    .venv/bin/python -m bench.overhead.run --quick    # smoke run (~2 min), 1 repetition
    .venv/bin/python -m bench.overhead.run --soak 200000   # Thermostat RSS after 20k and 200k requests

Starts its own fake upstream, the floor, Thermostat (`thermostat serve`, full path) and
the LiteLLM proxy (own venv `bench/.venv-litellm`, installed on first use), all on
127.0.0.1, then for each setting runs every target in turn (rotating the order each
repetition) with the same load generator in its own process. Medians over repetitions.
Writes bench/results/overhead-<date>[-quick].md and .json and prints the table.
Depends only on the CLI and HTTP of each target, never on Thermostat's internals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# One random local-only key per run, before the load generator module reads it: LiteLLM's master
# key, and the Authorization header every target gets (the others ignore it).
os.environ.setdefault("BENCH_API_KEY", "sk-" + secrets.token_hex(32))

from bench.overhead.loadgen import BENCH_KEY, HEADERS, request_body  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
LITELLM_VENV = BENCH / ".venv-litellm"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# wrk's measured run opens fresh connections (its warm-up is another process): at c=500 the
# connect storm puts 1-3 s of SYN retransmits into p99, so above this the aiohttp engine runs.
WRK_MAX_CONCURRENCY = 100

# ---- targets from issue 8 -----------------------------------------------------------
T_ADDED_P50_C1_MS = 0.5
T_ADDED_P99_C1_MS = 1.5
T_FLOOR_SHARE_C50 = 0.60
T_LITELLM_FACTOR_C50 = 3.0
T_P99_VS_FLOOR_C50 = 2.0
T_ADDED_TTFT_P50_MS = 1.0
T_RSS_GROWTH = 0.10
T_RSS_MB = 150.0


@dataclass
class Setting:
    name: str
    concurrency: int | None = None
    rate: float | None = None
    stream: bool = False

    def describe(self) -> str:
        kind = "stream" if self.stream else "non-stream"
        loop = f"closed c={self.concurrency}" if self.rate is None else f"open {self.rate:g} req/s"
        return f"{loop}, {kind}"


SETTINGS = [
    Setting("c1", concurrency=1),
    Setting("c50", concurrency=50),
    Setting("c500", concurrency=500),
    Setting("open200", rate=200),
    Setting("open1000", rate=1000),
    Setting("stream_c1", concurrency=1, stream=True),
    Setting("stream_c50", concurrency=50, stream=True),
    Setting("stream_c500", concurrency=500, stream=True),
]


# ---- processes ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    cmd: list[str]
    port: int
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        fh = open(self.log, "wb")
        env = {**os.environ, **(self.env or {})}
        self.popen = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        # Our own process group (start_new_session): the process and any workers it forked.
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (scan of /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def mem_kb(pid: int, key: str) -> int:
    """Sum of VmHWM / VmRSS (kB) over the process tree."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def post_json(url: str, body: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_ready(proc: Proc, url: str, timeout: float) -> str | None:
    """None when a chat completion through `url` answers 200, else the reason."""

    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited (code {proc.popen.returncode if proc.popen else '?'}): {proc.tail(800)}"
        try:
            status, _, body = post_json(url, request_body(False), timeout=3)
            if status == 200:
                return None
            last = f"HTTP {status}: {body[:300]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.3)
    return f"{proc.name} not ready after {timeout:.0f}s: {last}; log tail: {proc.tail(800)}"


def ensure_litellm(log: Path) -> tuple[Path | None, str]:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe, "already installed"
    print(f"installing litellm[proxy] into {LITELLM_VENV} (first run only) ...", flush=True)
    try:
        with open(log, "wb") as fh:
            subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
            subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True, stdout=fh, stderr=subprocess.STDOUT, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return None, f"install failed ({exc}); see {log}"
    return (exe, "installed") if exe.exists() else (None, f"no litellm executable after install; see {log}")


def litellm_version() -> str | None:
    py = LITELLM_VENV / "bin" / "python"
    if not py.exists():
        return None
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


@dataclass
class Target:
    name: str
    proc: Proc | None  # None: not started (skipped)
    base: str  # http://127.0.0.1:P
    note: str = ""
    skipped: str | None = None
    results: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base + "/v1/chat/completions"


def build_targets(tmp: Path, args: argparse.Namespace, upstream_cmd: list[str] | None = None,
                  server_toml: str = "", upstream_toml: str = "") -> tuple[Proc, list[Target]]:
    """The fake upstream and every target in front of it (not started).

    `upstream_cmd` replaces the fake upstream (its port is appended as `--port N`);
    `server_toml` / `upstream_toml` are extra lines for Thermostat's `[server]` / `[[upstreams]]`.
    """
    up_port = free_port()
    upstream = Proc(
        "upstream",
        [*upstream_cmd, "--port", str(up_port)] if upstream_cmd else
        [PY, "-m", "bench.overhead.fake_upstream", "--port", str(up_port), "--delay-ms", str(args.upstream_delay_ms),
         "--chunks", str(args.chunks), "--chunk-delay-ms", str(args.chunk_delay_ms)],
        up_port,
        tmp / "upstream.log",
    )
    up_base = f"http://127.0.0.1:{up_port}"
    targets = [Target("direct", upstream, up_base, note="the fake upstream itself (CPU/RSS columns are the upstream's)")]

    fport = free_port()
    floor = Proc("floor", [PY, "-m", "bench.overhead.floor", "--port", str(fport), "--upstream", up_base], fport, tmp / "floor.log")
    targets.append(Target("floor", floor, f"http://127.0.0.1:{fport}", note="bench/overhead/floor.py: aiohttp server + aiohttp ClientSession"))

    (tmp / "thermostat-data").mkdir()
    import msgspec

    from proxy.config import ServerSettings

    if "max_connections_per_client" not in server_toml and "max_connections_per_client" in {f.name for f in msgspec.structs.fields(ServerSettings)}:
        server_toml += "max_connections_per_client = 0\n"  # the load generator is one client address
    cfg = tmp / "thermostat.toml"
    cfg.write_text(
        f"""[server]
data_dir = "{tmp / 'thermostat-data'}"
{server_toml}
[[upstreams]]
name = "fake"
base_url = "{up_base}/v1"
models = ["*"]
{upstream_toml}
[optimization]
enabled = true
mode = "general"
policy = "thompson_gaussian"

[admin]
allow_unauthenticated = true
"""
    )
    thermostat_exe = str(Path(PY).parent / "thermostat")
    tport = free_port()
    th = Proc("thermostat", [thermostat_exe, "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(tport)], tport, tmp / "thermostat.log")
    targets.append(Target("thermostat", th, f"http://127.0.0.1:{tport}", note="`thermostat serve`, optimization general / thompson_gaussian"))

    if args.no_litellm:
        targets.append(Target("litellm", None, "", skipped="skipped (--no-litellm)"))
    else:
        exe, how = ensure_litellm(tmp / "litellm-install.log")
        if exe is None:
            targets.append(Target("litellm", None, "", skipped=f"skipped: {how}"))
        else:
            lport = free_port()
            lcfg = tmp / "litellm.yaml"
            lcfg.write_text(
                f"""model_list:
  - model_name: fake-model
    litellm_params:
      model: openai/fake-model
      api_base: {up_base}/v1
      api_key: sk-bench-fake
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  master_key: {BENCH_KEY}
"""
            )
            lenv = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True",
                    "NO_DOCS": "True", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
            lp = Proc("litellm", [str(exe), "--config", str(lcfg), "--host", "127.0.0.1", "--port", str(lport), "--num_workers", "1"],
                      lport, tmp / "litellm.log", env=lenv)
            targets.append(Target("litellm", lp, f"http://127.0.0.1:{lport}", note=f"LiteLLM proxy {litellm_version() or '?'} (`litellm --config`, 1 worker)"))
    return upstream, targets


# ---- running -------------------------------------------------------------------------


def run_loadgen(target: Target, s: Setting, args: argparse.Namespace) -> dict:
    engine = args.engine
    if engine == "auto":
        engine = "wrk" if (shutil.which("wrk") and not s.stream and s.rate is None and (s.concurrency or 0) <= WRK_MAX_CONCURRENCY) else "aiohttp"
    cmd = [PY, "-m", "bench.overhead.loadgen", "--url", target.url, "--engine", engine, "--duration", str(args.duration),
           "--warmup", str(args.warmup), "--timeout", str(args.timeout)]
    if s.rate is None:
        cmd += ["--concurrency", str(s.concurrency)]
    else:
        cmd += ["--rate", str(s.rate), "--max-inflight", "1000"]
    if s.stream:
        cmd.append("--stream")
    assert target.proc is not None
    pid = target.proc.pid
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.warmup + args.duration + 2 * args.timeout + 30)
    cpu1 = cpu_seconds(pid)
    try:
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"ok": 0, "errors": 1, "error_kinds": {"loadgen_failed": 1}, "rps": 0.0, "loadgen_stderr": out.stderr[-500:]}
    n = res.get("total_ok") or 0
    res["cpu_s"] = round(cpu1 - cpu0, 3)
    res["cpu_ms_per_req"] = round((cpu1 - cpu0) * 1000 / n, 4) if n else None
    res["peak_rss_mb"] = round(mem_kb(pid, "VmHWM") / 1024, 1)
    res["rss_mb"] = round(mem_kb(pid, "VmRSS") / 1024, 1)
    return res


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(targets: list[Target], settings: list[Setting]) -> dict[str, dict[str, dict]]:
    """Per setting and target: medians over repetitions; added latency as the median of per-repetition deltas vs direct."""
    direct = next(t for t in targets if t.name == "direct")
    table: dict[str, dict[str, dict]] = {}
    for s in settings:
        row: dict[str, dict] = {}
        for t in targets:
            runs = t.results.get(s.name, [])
            if not runs:
                continue
            agg = {k: med([r.get(k) for r in runs]) for k in
                   ("rps", "lat_p50_ms", "lat_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "cpu_ms_per_req", "hdr_overhead_p50_ms", "hdr_overhead_p99_ms")}
            agg["peak_rss_mb"] = max((r.get("peak_rss_mb") or 0) for r in runs)
            agg["errors"] = sum(r.get("errors", 0) for r in runs)
            agg["shed"] = sum(r.get("shed", 0) for r in runs)
            agg["ok"] = sum(r.get("ok", 0) for r in runs)
            agg["reps"] = len(runs)
            dr = direct.results.get(s.name, [])
            for key, name in (("lat_p50_ms", "added_p50_ms"), ("lat_p99_ms", "added_p99_ms"), ("ttft_p50_ms", "added_ttft_p50_ms")):
                deltas = [r[key] - d[key] for r, d in zip(runs, dr) if r.get(key) is not None and d.get(key) is not None]
                agg[name] = statistics.median(deltas) if deltas and t is not direct else None
            row[t.name] = agg
        table[s.name] = row
    return table


def verdicts(table: dict[str, dict[str, dict]], targets: list[Target], soak: dict | None = None) -> list[dict]:
    out: list[dict] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "pass": ok, "detail": detail})

    th = table.get("c1", {}).get("thermostat")
    if th:
        v = th["added_p50_ms"]
        add("c=1 added p50", v, f"<= {T_ADDED_P50_C1_MS} ms", v is not None and v <= T_ADDED_P50_C1_MS, f"{v:.3f} ms" if v is not None else "n/a")
        v = th["added_p99_ms"]
        add("c=1 added p99", v, f"<= {T_ADDED_P99_C1_MS} ms", v is not None and v <= T_ADDED_P99_C1_MS, f"{v:.3f} ms" if v is not None else "n/a")
    row = table.get("c50", {})
    th, fl, ll = row.get("thermostat"), row.get("floor"), row.get("litellm")
    if th and fl:
        share = th["rps"] / fl["rps"] if fl["rps"] else None
        add("c=50 throughput vs floor", share, f">= {T_FLOOR_SHARE_C50:.0%}", share is not None and share >= T_FLOOR_SHARE_C50,
            f"{th['rps']:.0f} / {fl['rps']:.0f} req/s = {share:.0%}" if share is not None else "n/a")
        ratio = th["lat_p99_ms"] / fl["lat_p99_ms"] if fl["lat_p99_ms"] else None
        add("c=50 p99 vs floor", ratio, f"<= {T_P99_VS_FLOOR_C50:g}x", ratio is not None and ratio <= T_P99_VS_FLOOR_C50,
            f"{th['lat_p99_ms']:.2f} / {fl['lat_p99_ms']:.2f} ms = {ratio:.2f}x" if ratio is not None else "n/a")
    if th and ll:
        f = th["rps"] / ll["rps"] if ll["rps"] else None
        add("c=50 throughput vs LiteLLM", f, f">= {T_LITELLM_FACTOR_C50:g}x", f is not None and f >= T_LITELLM_FACTOR_C50,
            f"{th['rps']:.0f} / {ll['rps']:.0f} req/s = {f:.1f}x" if f is not None else "n/a")
    elif th:
        lt = next((t for t in targets if t.name == "litellm"), None)
        add("c=50 throughput vs LiteLLM", None, f">= {T_LITELLM_FACTOR_C50:g}x", None, lt.skipped if lt and lt.skipped else "no LiteLLM result")
    for sname in ("stream_c1", "stream_c50"):
        th = table.get(sname, {}).get("thermostat")
        if th:
            v = th["added_ttft_p50_ms"]
            add(f"{sname} added TTFT p50", v, f"<= {T_ADDED_TTFT_P50_MS} ms", v is not None and v <= T_ADDED_TTFT_P50_MS, f"{v:.3f} ms" if v is not None else "n/a")
    peak = max((r.get("thermostat", {}).get("peak_rss_mb") or 0) for r in table.values()) if table else 0
    if peak:
        add("peak RSS (this run)", peak, f"<= {T_RSS_MB:g} MB", peak <= T_RSS_MB, f"{peak:.1f} MB")
    if soak:
        a, b = soak.get("rss_mb_at_20000"), soak.get("rss_mb_at_final")
        if a and b:
            g = (b - a) / a
            add(f"RSS growth 20k -> {soak['requests']}", g, f"<= {T_RSS_GROWTH:.0%}", g <= T_RSS_GROWTH, f"{a:.1f} -> {b:.1f} MB ({g:+.1%})")
            add("RSS after soak", b, f"<= {T_RSS_MB:g} MB", b <= T_RSS_MB, f"{b:.1f} MB")
    add("decision + guards per request", None, "<= 50 us", None, "measured by the policies benchmark, not here")
    return out


# ---- reporting -------------------------------------------------------------------------


def f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(meta: dict, settings: list[Setting], targets: list[Target], table: dict, checks: list[dict]) -> str:
    lines = [f"# Thermostat overhead benchmark, {meta['date']}", "", f"Command: `{meta['command']}`", ""]
    lines.append(
        f"Machine: {meta['cpu']} ({meta['cores']} cores), load average before / after the run {meta['loadavg_before']} / {meta.get('loadavg_after', '?')} (the machine is shared: other test runs add noise). "
        f"Python {meta['python']}; Thermostat at {meta['git']}; load generator: {meta['engine_note']}. "
        f"{meta['reps']} interleaved repetition(s) of {meta['warmup']:g} s warm-up + {meta['duration']:g} s measured per target and setting; "
        f"medians. Upstream: fake, delay {meta['upstream_delay_ms']:g} ms, streams {meta['chunks']} chunks {meta['chunk_delay_ms']:g} ms apart."
    )
    lines.append("")
    lines.append("Targets: " + "; ".join(f"**{t.name}**: {t.skipped or t.note}" for t in targets))
    lines.append("")
    lines.append("| setting | target | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | TTFT p50 ms | +TTFT p50 ms | CPU ms/req | peak RSS MB | errors/shed |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in settings:
        for t in targets:
            r = table.get(s.name, {}).get(t.name)
            if r is None:
                continue
            lines.append(
                f"| {s.name} ({s.describe()}) | {t.name} | {f(r['rps'], '{:.0f}')} | {f(r['lat_p50_ms'])} | {f(r['lat_p99_ms'])} | "
                f"{f(r['added_p50_ms'])} | {f(r['added_p99_ms'])} | {f(r['ttft_p50_ms'])} | {f(r['added_ttft_p50_ms'])} | "
                f"{f(r['cpu_ms_per_req'], '{:.3f}')} | {f(r['peak_rss_mb'], '{:.0f}')} | {r['errors']}/{r['shed']} |"
            )
    lines += ["", "Thermostat's own `x-thermostat-overhead-ms` header (median of per-run p50 / p99):", ""]
    lines.append("| setting | header p50 ms | header p99 ms |")
    lines.append("|---|---:|---:|")
    for s in settings:
        r = table.get(s.name, {}).get("thermostat")
        if r and r.get("hdr_overhead_p50_ms") is not None:
            lines.append(f"| {s.name} | {f(r['hdr_overhead_p50_ms'], '{:.3f}')} | {f(r['hdr_overhead_p99_ms'], '{:.3f}')} |")
    lines += ["", "## Targets from issue 8", "", "| target | limit | measured | result |", "|---|---|---|---|"]
    for c in checks:
        res = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "**FAIL**")
        lines.append(f"| {c['target']} | {c['limit']} | {c['detail']} | {res} |")
    skipped = [t for t in targets if t.skipped]
    for t in skipped:
        lines += ["", f"Note: {t.name} {t.skipped}"]
    lines.append("")
    return "\n".join(lines)


def machine_meta(args: argparse.Namespace, argv: list[str]) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "policies", "guards"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([".venv/bin/python -m bench.overhead.run", *argv]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "git": git + (" + uncommitted changes in proxy/policies/guards" if dirty else ""),
        "engine_note": (f"wrk (1 thread) for closed-loop non-streaming up to c={WRK_MAX_CONCURRENCY}, the aiohttp client (uvloop, connection reuse) for c=500, streaming and open loop" if args.engine == "auto" and shutil.which("wrk")
                        else f"{args.engine if args.engine != 'auto' else 'aiohttp'} for every setting"),
        "reps": args.reps, "warmup": args.warmup, "duration": args.duration,
        "upstream_delay_ms": args.upstream_delay_ms, "chunks": args.chunks, "chunk_delay_ms": args.chunk_delay_ms,
    }


def write_results(stem: str, meta: dict, md: str, payload: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    day = dt.date.today().isoformat()
    mdp = RESULTS / f"{stem}-{day}.md"
    jp = RESULTS / f"{stem}-{day}.json"
    mdp.write_text(md)
    jp.write_text(json.dumps(payload, indent=2, default=str))
    return mdp, jp


# ---- soak ------------------------------------------------------------------------------


def soak(args: argparse.Namespace, argv: list[str], tmp: Path) -> int:
    args.no_litellm = True
    upstream, targets = build_targets(tmp, args)
    th = next(t for t in targets if t.name == "thermostat")
    procs = [upstream, th.proc]
    try:
        for p in procs:
            p.start()
        for p, url in ((upstream, upstream_url(upstream)), (th.proc, th.url)):
            err = wait_ready(p, url, 30)
            if err:
                print(err, file=sys.stderr)
                return 1
        total, checkpoints = 0, []
        marks = sorted({20_000, *range(40_000, args.soak + 1, 40_000), args.soak}) if args.soak > 20_000 else [args.soak]
        deadline = time.monotonic() + args.soak_max_s
        t_start = time.monotonic()
        for mark in marks:
            while total < mark and time.monotonic() < deadline:
                need = mark - total
                budget = max(1.0, min(120.0, deadline - time.monotonic()))
                cmd = [PY, "-m", "bench.overhead.loadgen", "--url", th.url, "--concurrency", "50", "--requests", str(need),
                       "--duration", f"{budget:.1f}", "--warmup", "0", "--timeout", "10"]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=budget + 40)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                total += res.get("total_ok", 0) + res.get("errors", 0)
                if res.get("total_ok", 0) == 0:
                    print(f"soak: no progress: {res}", file=sys.stderr)
                    break
            rss = mem_kb(th.proc.pid, "VmRSS") / 1024
            checkpoints.append({"requests": total, "rss_mb": round(rss, 1), "elapsed_s": round(time.monotonic() - t_start, 1)})
            print(f"soak: {total:>7} requests  RSS {rss:.1f} MB  ({time.monotonic() - t_start:.0f} s)", flush=True)
            if time.monotonic() >= deadline:
                print("soak: time bound reached", flush=True)
                break
        at20 = next((c["rss_mb"] for c in checkpoints if c["requests"] >= 20_000), None)
        final = checkpoints[-1] if checkpoints else None
        result = {"requests": final["requests"] if final else 0, "rss_mb_at_20000": at20, "rss_mb_at_final": final["rss_mb"] if final else None,
                  "peak_rss_mb": round(mem_kb(th.proc.pid, "VmHWM") / 1024, 1), "checkpoints": checkpoints}
        meta = machine_meta(args, argv)
        checks = [c for c in verdicts({}, targets, result) if "RSS" in c["target"]]
        lines = [f"# Thermostat memory soak, {meta['date']}", "", f"Command: `{meta['command']}`", "",
                 f"Thermostat at {meta['git']}, closed loop c=50 non-streaming against the fake upstream, full path (general / thompson_gaussian).", "",
                 "| requests | RSS MB | elapsed s |", "|---:|---:|---:|"]
        lines += [f"| {c['requests']} | {c['rss_mb']:.1f} | {c['elapsed_s']:.0f} |" for c in checkpoints]
        lines += ["", f"Peak RSS (VmHWM): {result['peak_rss_mb']:.1f} MB", "", "| target | limit | measured | result |", "|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {c['limit']} | {c['detail']} | {'PASS' if c['pass'] else '**FAIL**'} |")
        md = "\n".join(lines) + "\n"
        mdp, jp = write_results("overhead-soak", meta, md, {"meta": meta, "soak": result, "checks": checks})
        print(md)
        print(f"wrote {mdp} and {jp}")
        return 0
    finally:
        for p in procs:
            p.stop()


def upstream_url(p: Proc) -> str:
    return f"http://127.0.0.1:{p.port}/v1/chat/completions"


# ---- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="Thermostat overhead benchmark (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="1 repetition, 2 s measured, 0.5 s warm-up")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per target, setting and repetition")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout of the load generator")
    p.add_argument("--settings", default="", help="comma-separated subset of: " + ",".join(s.name for s in SETTINGS))
    p.add_argument("--targets", default="", help="comma-separated subset of: direct,floor,thermostat,litellm")
    p.add_argument("--engine", choices=["auto", "aiohttp", "wrk"], default="auto")
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--upstream-delay-ms", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk-delay-ms", type=float, default=1.0)
    p.add_argument("--soak", type=int, nargs="?", const=200_000, default=None, help="memory soak: N requests through Thermostat (default 200000)")
    p.add_argument("--soak-max-s", type=float, default=600.0)
    p.add_argument("--tag", default="", help="suffix for the result file names")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 2.0, 0.5

    tmp = Path(tempfile.mkdtemp(prefix="thermostat-bench-"))
    if args.soak:
        return soak(args, argv, tmp)

    settings = [s for s in SETTINGS if not args.settings or s.name in args.settings.split(",")]
    meta = machine_meta(args, argv)
    upstream, targets = build_targets(tmp, args)
    if args.targets:
        keep = set(args.targets.split(",")) | {"direct"}
        targets = [t for t in targets if t.name in keep]
    started: list[Proc] = []
    try:
        upstream.start()
        started.append(upstream)
        err = wait_ready(upstream, upstream_url(upstream), 20)
        if err:
            print(err, file=sys.stderr)
            return 1
        for t in targets:
            if t.proc is None or t.proc is upstream:
                continue
            t.proc.start()
            started.append(t.proc)
        for t in targets:
            if t.proc is None or t.proc is upstream:
                continue
            err = wait_ready(t.proc, t.url, 120 if t.name == "litellm" else 30)
            if err:
                if t.name == "thermostat":
                    print(f"thermostat did not start: {err}", file=sys.stderr)
                    return 1
                reason = " ".join(err.split())[-300:].replace("|", "/")
                t.skipped = f"skipped: could not start (...{reason})"
                print(f"{t.name}: {t.skipped}", flush=True)
                t.proc.stop()
        live = [t for t in targets if not t.skipped and t.proc is not None]
        print(f"run dir {tmp}; targets: " + ", ".join(f"{t.name}={t.base}" for t in live), flush=True)
        for s in settings:
            for rep in range(args.reps):
                order = live[rep % len(live):] + live[: rep % len(live)]
                for t in order:
                    if not t.proc.alive():
                        t.skipped = t.skipped or f"skipped: process died during the run ({t.proc.tail(300)})"
                        continue
                    r = run_loadgen(t, s, args)
                    t.results.setdefault(s.name, []).append(r)
                    print(f"  {s.name:<12} rep {rep + 1}/{args.reps} {t.name:<20} {r.get('rps', 0):>8.0f} req/s  p50 {f(r.get('lat_p50_ms'))}  "
                          f"p99 {f(r.get('lat_p99_ms'))}  ttft {f(r.get('ttft_p50_ms'))}  cpu/req {f(r.get('cpu_ms_per_req'), '{:.3f}')} ms  "
                          f"err {r.get('errors', 0)} shed {r.get('shed', 0)}", flush=True)
        meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        table = aggregate(targets, settings)
        checks = verdicts(table, targets)
        md = markdown(meta, settings, targets, table, checks)
        stem = "overhead" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
        payload = {"meta": meta, "settings": [s.__dict__ for s in settings],
                   "targets": [{"name": t.name, "note": t.note, "skipped": t.skipped} for t in targets],
                   "table": table, "checks": checks, "raw": {t.name: t.results for t in targets}}
        mdp, jp = write_results(stem, meta, md, payload)
        print()
        print(md)
        print(f"wrote {mdp} and {jp}")
        return 0
    finally:
        for proc in reversed(started):
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
