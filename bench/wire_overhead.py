"""Overhead of the Responses and Messages paths against chat completions, end to end.

The real app on a loopback port in front of the test fake upstream (which speaks all three
formats), optimisation on (general, every request decided and patched). Per path and per
mode (non-streamed, streamed): Thermostat's own `x-thermostat-overhead-ms` (time spent in
Thermostat before the first byte leaves), the added latency (proxied minus direct, both
measured by the same keep-alive httpx client, requests alternated) and, streamed, the
added time to the first content event. Sequential requests: this measures per-request
cost, not throughput (bench/overhead does that for chat).

    .venv/bin/python bench/wire_overhead.py [--n 300]    # writes bench/results/wire_overhead.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_config  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.servers import start_thermostat  # noqa: E402

TEXT = "Summarise the following report in three bullet points: revenue is up four percent on volume."
PATHS: dict[str, tuple[str, dict[str, Any], bytes]] = {
    "chat": ("/chat/completions", {"model": "echo-1", "messages": [{"role": "user", "content": TEXT}], "temperature": 0.7, "max_tokens": 200},
             b'"content"'),
    "responses": ("/responses", {"model": "echo-1", "input": TEXT, "temperature": 0.7, "max_output_tokens": 200},
                  b"response.output_text.delta"),
    "messages": ("/messages", {"model": "claude-x", "max_tokens": 200, "messages": [{"role": "user", "content": TEXT}],
                               "output_config": {"effort": "medium"}}, b"text_delta"),
}


def _one(client: httpx.Client, url: str, body: dict[str, Any], marker: bytes) -> tuple[float, float | None, float | None]:
    """(latency_s, first-content time or None, Thermostat's overhead ms or None)."""
    t0 = time.perf_counter()
    first: float | None = None
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            if first is None and marker in chunk:
                first = time.perf_counter() - t0
    overhead = r.headers.get("x-thermostat-overhead-ms")
    return time.perf_counter() - t0, first, float(overhead) if overhead is not None else None


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wire_overhead.md"))
    args = ap.parse_args()
    up = FakeUpstream().start()
    ups = [
        {"name": "oa", "base_url": up.url, "models": ["*"]},
        {"name": "an", "base_url": up.url, "format": "anthropic", "models": ["claude-*"],
         "models_config": [{"pattern": "claude-*", "efforts": ["low", "medium", "high"]}]},
    ]
    opt = {"mode": "general", "policy": "thompson_gaussian", "seed": 1, "holdout_fraction": 0.0, "tune_temperature": "always"}
    running = start_thermostat(make_config(up.url, Path(tempfile.mkdtemp()), optimization=opt, upstreams=ups))
    rows = []
    try:
        with httpx.Client(timeout=10) as client:
            for name, (path, body, marker) in PATHS.items():
                for stream in (False, True):
                    b = {**body, "stream": stream}
                    for _ in range(20):  # warm-up: connections, caches, the policy's first draws
                        _one(client, running.url + path, b, marker)
                        _one(client, up.url + path, b, marker)
                    prox_lat, dir_lat, prox_first, dir_first, over = [], [], [], [], []
                    for _ in range(args.n):
                        lat, first, oh = _one(client, running.url + path, b, marker)
                        prox_lat.append(lat * 1000)
                        if first is not None:
                            prox_first.append(first * 1000)
                        if oh is not None:
                            over.append(oh)
                        lat, first, _ = _one(client, up.url + path, b, marker)
                        dir_lat.append(lat * 1000)
                        if first is not None:
                            dir_first.append(first * 1000)
                    added = statistics.median(prox_lat) - statistics.median(dir_lat)
                    added_ttft = statistics.median(prox_first) - statistics.median(dir_first) if stream and prox_first and dir_first else None
                    rows.append((name, "stream" if stream else "json", statistics.median(over), _q(over, 90), added,
                                 statistics.median(prox_lat), added_ttft))
    finally:
        running.stop()
        up.stop()
    lines = [
        "# Wire-format overhead: Responses and Messages vs chat completions",
        "",
        f"`.venv/bin/python bench/wire_overhead.py --n {args.n}` on {platform.processor() or platform.machine()}, Python {platform.python_version()},"
        " 2 shared cores; sequential requests, optimisation on (general, every request decided and patched), the test fake upstream.",
        "",
        "| path | mode | overhead-ms p50 | overhead-ms p90 | added latency p50 (ms) | proxied latency p50 (ms) | added TTFT p50 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, mode, o50, o90, added, lat, attft in rows:
        lines.append(f"| {name} | {mode} | {o50:.3f} | {o90:.3f} | {added:.2f} | {lat:.2f} | {'' if attft is None else f'{attft:.2f}'} |")
    chat = {mode: o50 for name, mode, o50, *_ in rows if name == "chat"}
    lines += ["", "Overhead p50 relative to chat's (same mode):", ""]
    for name, mode, o50, *_ in rows:
        if name != "chat":
            lines.append(f"- {name} {mode}: {100 * (o50 / chat[mode] - 1):+.0f} %")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
