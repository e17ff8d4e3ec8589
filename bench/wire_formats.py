"""Cost of the wire-format adapters on the request path (proxy/edge/formats).

Per format: `parse` (the knob view of an already-decoded body) + `patch` (three knobs
written under the client's field names) + re-encode, and the per-event cost of reading a
stream as it is relayed (`StreamRelay` with the format's summarizer, or the chat chunk
reading for chat). Bodies and streams are the fake upstream's shapes (proxy/demo/wire.py).

    .venv/bin/python bench/wire_formats.py        # writes bench/results/wire_formats.md
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.records import Params
from proxy.demo.wire import anthropic_body, anthropic_events, responses_body, responses_events
from proxy.edge.formats import ANTHROPIC, CHAT, RESPONSES
from proxy.edge.formats.base import WireFormat
from proxy.edge.sse import StreamRelay

ITERATIONS = 20_000
ROUNDS = 5
TEXT = "Summarise the following report in three bullet points.\n" + "The quarter closed with revenue up 4 % on volume. " * 20
WORDS = [(" " if i else "") + w for i, w in enumerate(("the answer has forty words " * 8).split())]

BODIES: dict[str, tuple[WireFormat, dict]] = {
    "chat": (CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}],
                    "temperature": 0.7, "max_completion_tokens": 800, "reasoning_effort": "medium", "stream": True}),
    "responses": (RESPONSES, {"model": "o4-mini", "input": [{"role": "user", "content": TEXT}], "instructions": "Be brief.",
                              "temperature": 0.7, "max_output_tokens": 800, "reasoning": {"effort": "medium", "summary": "auto"}, "stream": True}),
    "anthropic": (ANTHROPIC, {"model": "claude-sonnet", "max_tokens": 800, "system": "Be brief.", "messages": [{"role": "user", "content": TEXT}],
                              "output_config": {"effort": "medium"}, "stream": True}),
}


def _chat_events() -> list[bytes]:
    out = []
    for w in WORDS:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    return [*out, b"data: [DONE]\n\n"]


STREAMS: dict[str, tuple[WireFormat, list[bytes]]] = {
    "chat": (CHAT, _chat_events()),
    "responses": (RESPONSES, responses_events(responses_body(ident="resp_x", model="m", text="".join(WORDS), input_tokens=300,
                                                             output_tokens=len(WORDS), truncated=False, created=1, request={}), WORDS)),
    "anthropic": (ANTHROPIC, anthropic_events(anthropic_body(ident="msg_x", model="m", text="".join(WORDS), input_tokens=300,
                                                             output_tokens=len(WORDS), truncated=False), WORDS)),
}


def best_us(fn: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return min(runs)


def main() -> None:
    rows = []
    knobs = Params(temperature=0.6, max_tokens=700, effort="high")
    for name, (fmt, body) in BODIES.items():
        def request(fmt: WireFormat = fmt, body: dict = body) -> bytes:
            doc = copy.copy(body)  # the edge owns its freshly decoded dict; a shallow copy stands in for that
            fmt.parse(doc)
            fmt.patch(doc, knobs)
            return msgspec.json.encode(doc)

        per_request = best_us(request, ITERATIONS)
        fmt_s, events = STREAMS[name]

        def stream(fmt: WireFormat = fmt_s, events: list[bytes] = events) -> None:
            relay = StreamRelay(strip_usage=False, summarizer=fmt.stream_summarizer())
            for event in events:
                relay.feed(event)

        per_stream = best_us(stream, ITERATIONS // 20)
        rows.append((name, per_request, per_stream / len(events), len(events)))
    lines = [
        "# Wire-format adapter cost",
        "",
        f"`.venv/bin/python bench/wire_formats.py` on {platform.python_implementation()} {platform.python_version()}, {platform.machine()}; "
        f"best of {ROUNDS} rounds (median of rounds is noisier on the shared 2-core machine).",
        "",
        "| format | parse + patch (3 knobs) + encode, µs/request | stream reading, µs/event | events per stream |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {n} | {r:.1f} | {e:.2f} | {k} |" for n, r, e, k in rows),
        "",
    ]
    out = Path(__file__).resolve().parent / "results" / "wire_formats.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
