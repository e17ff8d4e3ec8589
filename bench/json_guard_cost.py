"""Cost of the hostile-input checks on a decided body (proxy/edge/json_guard.py).

A typical ~2 KB chat body (system + user message with newlines, one tool with a JSON
schema, temperature and max_tokens) is parsed by `parse_completion_body` (msgspec
decode + depth + int64 + duplicate-key checks) and by the bare msgspec decode; the
difference is what the checks cost. The body is compact, as the official SDKs send
it; the slower steps of the duplicate check (taken for bodies with whitespace, and for
bodies with an ASCII `\\u00XX` escape) are timed on variants of the same body.

    .venv/bin/python bench/json_guard_cost.py         # writes bench/results/json_guard_cost.md
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.edge.asgi import parse_completion_body
from proxy.edge.json_guard import duplicate_watched_key, too_deep

ITERATIONS = 20_000
ROUNDS = 7

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
DOC = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a careful assistant.\nAnswer briefly.\n" * 4},
        {"role": "user", "content": ("Summarise the following text in three bullet points.\n" + "lorem ipsum dolor sit amet " * 45)},
    ],
    "tools": [TOOL],
    "temperature": 0.7,
    "max_tokens": 512,
}
# Compact, as the official SDKs send it (httpx: separators=(",", ":"), ensure_ascii=False).
TYPICAL = json.dumps(DOC, ensure_ascii=False, separators=(",", ":")).encode()
# Python's default separators: step 1 cannot decide, step 2 (byte counts) does.
SPACED = json.dumps(DOC, ensure_ascii=False).encode()
# An ASCII escape sends the body to step 3 (the exact parse).
ESCAPED = SPACED.replace(b"three bullet", b"\\u003cthree\\u003e bullet")


def per_call_us(fn: Callable[[], object]) -> float:
    """Median over rounds of the mean time per call, in microseconds."""
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(ITERATIONS):
            fn()
        rounds.append((time.perf_counter() - t0) / ITERATIONS * 1e6)
    return statistics.median(rounds)


def main() -> None:
    decode = msgspec.json.Decoder().decode
    doc = decode(TYPICAL)
    esc_doc = decode(ESCAPED)
    spaced_doc = decode(SPACED)
    rows = [
        ("msgspec decode only (before)", per_call_us(lambda: decode(TYPICAL))),
        ("parse_completion_body (after: decode + all checks)", per_call_us(lambda: parse_completion_body(TYPICAL))),
        ("  depth check alone", per_call_us(lambda: too_deep(TYPICAL, doc))),
        ("  duplicate-key check alone, compact body (step 1)", per_call_us(lambda: duplicate_watched_key(TYPICAL, doc))),
        ("  duplicate-key check alone, body with spaces (steps 1-2)", per_call_us(lambda: duplicate_watched_key(SPACED, spaced_doc))),
        ("  duplicate-key check alone, body with a \\u003c escape (steps 1-3)", per_call_us(lambda: duplicate_watched_key(ESCAPED, esc_doc))),
    ]
    lines = [
        "# Cost of the hostile-input checks per decided request",
        "",
        f"`bench/json_guard_cost.py`, {len(TYPICAL)}-byte chat body, {ITERATIONS} calls x {ROUNDS} rounds (median of round means),",
        f"Python {platform.python_version()}, msgspec {msgspec.__version__}, {platform.machine()}, load average {os.getloadavg()[0]:.1f}",
        "(a shared machine: compare rows of one run, not runs).",
        "",
        "| what | µs per request |",
        "|---|---|",
        *(f"| {name} | {us:.2f} |" for name, us in rows),
        "",
    ]
    out = Path(__file__).parent / "results" / "json_guard_cost.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
