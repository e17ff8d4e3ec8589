"""The SSE relay on its own: events split wherever the bytes break, summary collected,
only what Thermostat itself asked for removed, unbounded events relayed unread."""

from __future__ import annotations

import json

import msgspec

from proxy.common import summarize_body
from proxy.edge import StreamRelay
from tests.support.memory_transport import chat_json, chat_sse


def relay_all(relay: StreamRelay, data: bytes, step: int) -> bytes:
    out = b"".join(relay.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + relay.flush()


def test_every_split_point_gives_the_same_stream_and_summary() -> None:
    stream = b"".join(chat_sse(["Hel", "lo", "."], prompt_tokens=11, completion_tokens=4))
    for step in (1, 2, 7, 64, len(stream)):
        relay = StreamRelay(strip_usage=False)
        assert relay_all(relay, stream, step) == stream
        s = relay.summary
        assert (s.content, s.finish_reason, s.prompt_tokens, s.completion_tokens) == ("Hello.", "stop", 11, 4)
        assert relay.saw_done and relay.events == 6


def test_strip_usage_drops_only_the_chunk_thermostat_asked_for() -> None:
    events = chat_sse(["a", "b"])
    usage_null = events[0].replace(b'"finish_reason":null}]', b'"finish_reason":null}],"usage":null')
    assert usage_null != events[0]
    stream = b"".join([usage_null, *events[1:]])
    relay = StreamRelay(strip_usage=True)
    out = relay_all(relay, stream, 5)
    # usage:null removed from the chunk, the usage-only chunk gone, everything else untouched
    assert out == b"".join([events[0], events[1], events[2], events[4]])
    assert relay.summary.completion_tokens == 3


def test_crlf_events_comments_and_unparseable_data_are_relayed() -> None:
    stream = b": ping\r\n\r\ndata: not json\r\n\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\r\n\r\n"
    relay = StreamRelay(strip_usage=True)
    assert relay_all(relay, stream, 3) == stream
    assert relay.summary.content == "x" and relay.events == 3 and not relay.saw_done


def test_an_event_past_the_cap_switches_to_unsummarised_passthrough() -> None:
    relay = StreamRelay(strip_usage=False, max_event_bytes=16)
    first = relay.feed(b"data: " + b"x" * 40)
    assert first == b"data: " + b"x" * 40 and relay.unsummarised
    assert relay.feed(b"\n\ndata: [DONE]\n\n") == b"\n\ndata: [DONE]\n\n"
    assert not relay.saw_done  # no longer read


def test_a_stream_past_the_total_cap_drops_its_text_and_passes_through() -> None:
    """Memory per stream stays bounded however long the upstream streams: the kept text goes, the bytes still flow."""
    events = chat_sse(["a" * 10] * 20)
    stream = b"".join(events)
    cap = len(b"".join(events[:5])) + 3
    relay = StreamRelay(strip_usage=False, max_event_bytes=1000, max_total_bytes=cap)
    assert relay_all(relay, stream, 7) == stream
    assert relay.unsummarised and relay.summary.content == "" and relay.summary.completion_tokens is None
    assert cap < relay.read_bytes <= cap + 7  # counting stops at the read that crossed the cap
    under = StreamRelay(strip_usage=False, max_event_bytes=1000, max_total_bytes=len(stream))
    assert relay_all(under, stream, 7) == stream
    assert not under.unsummarised and under.summary.content == "a" * 200


def test_unterminated_last_event_comes_out_on_flush() -> None:
    relay = StreamRelay(strip_usage=False)
    assert relay.feed(b'data: {"choices":[]}') == b""
    assert relay.flush() == b'data: {"choices":[]}'


def test_non_stream_summary_and_garbage() -> None:
    s = summarize_body(chat_json("Hi", prompt_tokens=2, completion_tokens=1))
    assert (s.content, s.finish_reason, s.prompt_tokens, s.completion_tokens) == ("Hi", "stop", 2, 1)
    tool = msgspec.json.encode({"choices": [{"index": 0, "message": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"a":'}}, {"index": 0, "function": {"arguments": "1}"}}]}}]})
    assert summarize_body(tool).tool_arguments == ['{"a":1}']
    empty = summarize_body(b"<html>")
    assert (empty.content, empty.prompt_tokens) == ("", None)


def test_tool_calls_keep_their_names_for_schema_validation() -> None:
    """The validator checks arguments against the named tool's parameters, so the name must survive."""
    body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "c0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"index": 1, "id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]}}]}
    summary = summarize_body(json.dumps(body).encode())
    assert summary.tool_calls == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    relay = StreamRelay(strip_usage=False)
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
    ]
    for c in chunks:
        relay.feed(b"data: " + json.dumps(c).encode() + b"\n\n")
    assert relay.summary.tool_calls == [("get_weather", '{"city": "Paris"}')]


def reference_events(data: bytes) -> list[tuple[bytes, bytes | None]]:
    """Events and their data by the SSE rules written out plainly (any of CRLF/LF/CR line ends)."""
    out = []
    start = 0
    while True:
        lf, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            end, sep = crlf, 4
        elif lf >= 0:
            end, sep = lf, 2
        else:
            return out
        event = data[start : end + sep]
        lines = [ln[5:][1:] if ln[5:].startswith(b" ") else ln[5:] for ln in event.splitlines() if ln.startswith(b"data:")]
        out.append((event, b"\n".join(lines) if lines else None))
        start = end + sep


def test_the_fast_paths_split_and_read_events_as_the_plain_rules_do() -> None:
    """The relay skips the CRLF search and the line split for the usual `data: ...\\n\\n` event;
    any stream, mixed line ends included, must come out as the plain rules split and read it."""
    import random

    from proxy.edge.sse import event_data

    rng = random.Random(5)
    pieces = [b"data: {\"a\":1}", b"data:x", b": ping", b"event: e", b"data: two", b"data: lines", b"id: 7"]
    for _ in range(300):
        events = []
        for _ in range(rng.randint(1, 6)):
            end = rng.choice([b"\n", b"\r\n"])
            lines = rng.sample(pieces, rng.randint(1, 3))
            if rng.random() < 0.1:
                lines = [lines[0] + b"\rstray"]
            events.append(end.join(lines) + end + end)
        stream = b"".join(events)
        expected = reference_events(stream)
        assert [event_data(e) for e, _ in expected] == [d for _, d in expected]
        relay = StreamRelay(strip_usage=False)
        step = rng.randint(1, len(stream))
        assert relay_all(relay, stream, step) == stream
        assert relay.events == len(expected)


def test_answer_text_is_kept_in_blocks_not_one_object_per_piece() -> None:
    from proxy.common import TEXT_BLOCK, ResponseSummary

    summary = ResponseSummary()
    pieces = [f"t{i} " for i in range(1000)]
    for piece in pieces:
        summary.add_text(piece)
    assert summary.content == "".join(pieces)
    # 1,000 pieces are 15 joined blocks and the 40 latest pieces, not 1,000 strings.
    assert len(summary.content_parts) == 1000 % TEXT_BLOCK == 40
    summary.clear_text()
    assert summary.content == "" and not summary.content_parts
