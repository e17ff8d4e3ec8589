"""The JSON bounds: depth, int64 and repeated top-level fields, on both their fast and exact paths."""

from __future__ import annotations

import json

import msgspec
import pytest

from proxy.edge import StreamRelay
from proxy.edge.json_guard import MAX_JSON_DEPTH, duplicate_watched_key, first_out_of_range_int, too_deep


def nested(levels: int) -> bytes:
    return b'{"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_depth_bound_is_exact() -> None:
    ok, over = nested(MAX_JSON_DEPTH), nested(MAX_JSON_DEPTH + 1)
    assert not too_deep(ok, msgspec.json.decode(ok))
    assert too_deep(over, msgspec.json.decode(over))


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    raw = json.dumps({"messages": [{"content": "[" * 500}]}).encode()
    assert not too_deep(raw, msgspec.json.decode(raw))  # exact walk: 3 levels


def test_wide_documents_are_not_deep() -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]} for _ in range(200)]}).encode()
    assert not too_deep(raw, msgspec.json.decode(raw))


@pytest.mark.parametrize(("value", "bad"), [(2**63 - 1, False), (2**63, True), (-(2**63), False), (-(2**63) - 1, True), (1e300, False), (True, False)])
def test_int64_bound(value: object, bad: bool) -> None:
    assert first_out_of_range_int({"model": "m", "seed": value}) == ("seed" if bad else None)


def check(raw: bytes) -> str | None:
    return duplicate_watched_key(raw, msgspec.json.decode(raw))


def test_duplicates_of_watched_top_level_keys() -> None:
    assert check(b'{"temperature":5,"temperature":0.5}') == "temperature"
    assert check(b'{"max_tokens":5, "model":"a", "max_tokens" :7}') == "max_tokens"
    assert check(b'{"temperature":5,"temp\\u0065rature":0.5}') == "temperature"  # spelt with an escape
    assert check(b'{"stream":true,"\\u0073tream":false}') == "stream"


def test_no_false_duplicates() -> None:
    assert check(b'{"temperature":0.5,"messages":[{"content":"\\"temperature\\""}]}') is None
    assert check(b'{"temperature":0.5,"tools":[{"p":{"temperature":1}},{"p":{"temperature":2}}]}') is None  # nested: not a field
    assert check(b'{"model":"m","metadata":{"model":"x","model":"y"}}') is None
    assert check(b'{"model":"m","x":1,"x":2}') is None  # not a field Thermostat reads
    assert check(json.dumps({"model": "m", "temperature": 1, "messages": [{"content": "temperature"}]}).encode()) is None  # spaces: step 2
    assert check(b'{"model":"\\u00e9\\u003c","n":123456789012345678901234567890}') is None  # exact path, huge int


def test_stream_relay_stops_buffering_an_endless_event() -> None:
    relay = StreamRelay(strip_usage=False, max_event_bytes=100)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    assert relay.feed(first) == first
    endless = b"data: " + b"x" * 150
    assert relay.feed(endless) == endless  # over the bound: relayed, not held
    assert relay.unsummarised
    tail = b'yyy\n\ndata: {"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[]}\n\n'
    assert relay.feed(tail) == tail  # passed through unread from now on
    assert relay.summary.content == "hi" and relay.summary.completion_tokens is None


def test_new_wire_format_knobs_are_watched_for_duplicates() -> None:
    """A repeated `max_output_tokens` or `output_config` would let the upstream see a value that was never validated."""
    import msgspec

    from proxy.edge.json_guard import duplicate_watched_key

    for body in (b'{"model":"m","max_output_tokens":5,"max_output_tokens":500000}',
                 b'{"model":"m","output_config":{"effort":"low"},"output_config":{"effort":"max"}}',
                 b'{"model":"m","reasoning":{"effort":"low"}, "reasoning":{"effort":"high"}}'):
        doc = msgspec.json.decode(body)
        assert duplicate_watched_key(body, doc) in ("max_output_tokens", "output_config", "reasoning")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b'{"model":"m","temperature":5,"temperature":0.5}', "temperature"),  # compact: re-encoding drops the first
        (b'{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}', "stream_options.include_usage"),
        (b'{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}', None),  # not a watched object
        (b'{"model":"m","messages":[{"role":"user","content":"Hi."}],"temperature":0.7,"stream_options":{"include_usage":true}}', None),
        (b'{"model":"m","big":[123456789012345678901234567890],"stream":true}', None),
        (b'{"model":"m","t":1e-05,"temperature":1,"temperature":2}', "temperature"),  # spelled unlike msgspec's encoding
    ],
)
def test_compact_bodies_same_verdict_as_the_exact_check(raw: bytes, expected: str | None) -> None:
    """Step 0 (a compact body that re-encodes to itself) never hides a repeat the later steps find."""
    assert duplicate_watched_key(raw, msgspec.json.decode(raw)) == expected
