"""Wire-format adapters (proxy/edge/formats): parse, patch, summaries, streams, error shapes.

Bodies and streams come from proxy/demo/wire.py, whose shapes tests/integration/
test_wire_upstreams.py checks against the official openai and anthropic SDKs, plus
hand-written events for tool calls, refusals and errors.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from policies.records import Params
from proxy.common import ProxyError
from proxy.demo.wire import anthropic_body, anthropic_events, responses_body, responses_events, sse
from proxy.edge import CHAT, StreamRelay
from proxy.edge.formats import ANTHROPIC, COMPLETIONS, FORMATS, RESPONSES, adapter_for


def _relay(events: list[bytes], relay: StreamRelay, split: int = 7) -> tuple[bytes, list[bool]]:
    """Feed the stream in odd-sized chunks (events straddle chunks); (bytes out, first_token after each feed)."""
    data = b"".join(events)
    out: list[bytes] = []
    flags: list[bool] = []
    for i in range(0, len(data), split):
        out.append(relay.feed(data[i : i + split]))
        flags.append(relay.first_token)
    out.append(relay.flush())
    return b"".join(out), flags


# ---- registry ---------------------------------------------------------------------------


def test_registry_maps_each_decided_path_to_its_adapter() -> None:
    assert adapter_for("/chat/completions") is CHAT
    assert adapter_for("/completions") is COMPLETIONS
    assert adapter_for("/responses") is RESPONSES
    assert adapter_for("/messages") is ANTHROPIC
    assert adapter_for("/embeddings") is None
    assert adapter_for("/responses/resp_1") is None  # retrieval is passed through
    assert {f.name for f in FORMATS.values()} == {"chat", "completions", "responses", "anthropic"}
    assert ANTHROPIC.upstream_format == "anthropic" and RESPONSES.upstream_format == "openai"


# ---- chat and completions -----------------------------------------------------------------


def test_chat_view_reads_the_clients_fields() -> None:
    doc = {"model": "gpt-x", "messages": [], "temperature": 0.4, "max_completion_tokens": 300, "max_tokens": 900,
           "reasoning_effort": "low", "stream": True, "response_format": {"type": "json_object"}, "tools": [{"type": "function"}]}
    view = CHAT.parse(doc)
    assert (view.model, view.temperature, view.tokens_field, view.max_tokens) == ("gpt-x", 0.4, "max_completion_tokens", 300)
    assert (view.effort, view.effort_path, view.stream, view.json_mode, view.has_tools) == ("low", ("reasoning_effort",), True, True, True)


def test_chat_patch_uses_the_clients_field_names_and_reports_change() -> None:
    doc: dict[str, Any] = {"model": "m", "messages": [], "max_completion_tokens": 300, "reasoning_effort": "low"}
    assert CHAT.patch(doc, Params(temperature=0.30000000000000004, max_tokens=250, effort="medium"))
    assert doc == {"model": "m", "messages": [], "max_completion_tokens": 250, "reasoning_effort": "medium", "temperature": 0.3}
    assert not CHAT.patch(doc, Params(temperature=0.3, max_tokens=250, effort="medium"))
    bare: dict[str, Any] = {"model": "m", "prompt": "x"}
    assert COMPLETIONS.patch(bare, Params(max_tokens=40))
    assert bare["max_tokens"] == 40 and "reasoning_effort" not in bare


def test_completions_has_no_effort_knob() -> None:
    view = COMPLETIONS.parse({"model": "m", "prompt": "x", "reasoning_effort": "bogus"})
    assert view.effort is None and view.effort_path == ()
    doc: dict[str, Any] = {"model": "m", "prompt": "x"}
    assert not COMPLETIONS.patch(doc, Params(effort="high"))
    assert doc == {"model": "m", "prompt": "x"}


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"messages": []}, "model"),
        ({"model": "m", "temperature": "hot"}, "temperature"),
        ({"model": "m", "temperature": 2.5}, "temperature"),
        ({"model": "m", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "max_completion_tokens": True}, "max_completion_tokens"),
        ({"model": "m", "stream": "yes"}, "stream"),
        ({"model": "m", "reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_chat_refuses_what_it_cannot_tune_with_a_400(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        CHAT.parse(doc)
    assert info.value.status == 400 and info.value.param == param


def test_chat_summaries_and_relay_are_the_existing_ones() -> None:
    raw = json.dumps({"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode()
    summary = CHAT.summarize_body(raw)
    assert (summary.content, summary.finish_reason, summary.prompt_tokens, summary.completion_tokens) == ("hi", "length", 5, 2)
    assert CHAT.stream_summarizer() is None
    # Without a summarizer the relay reads chat chunks and flags the first relayed event, as before.
    relay = StreamRelay(strip_usage=False)
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    assert relay.feed(chunk + b"data: [DONE]\n\n") == chunk + b"data: [DONE]\n\n"
    assert relay.first_token and relay.summary.content == "a"


def test_openai_error_shape_for_thermostats_own_errors() -> None:
    body = json.loads(RESPONSES.error_body(400, "'max_output_tokens' must be an integer", "invalid_type"))
    assert body == {"error": {"message": "'max_output_tokens' must be an integer", "type": "invalid_request_error", "code": "invalid_type", "param": None}}
    assert json.loads(CHAT.error_body(502, "down", "upstream_unreachable"))["error"]["type"] == "upstream_error"


# ---- Responses ----------------------------------------------------------------------------------


def _response(**overrides: Any) -> dict[str, Any]:
    request = {"model": "gpt-r", "input": "hi", "max_output_tokens": 3}
    base = responses_body(ident="resp_abc", model="gpt-r", text="one two three", input_tokens=11, output_tokens=3, truncated=False,
                          created=1, request=request)
    base.update(overrides)
    return base


def test_responses_view_and_patch_leave_everything_else_untouched() -> None:
    doc: dict[str, Any] = {
        "model": "o-r", "input": [{"role": "user", "content": "x"}], "temperature": 0.7, "max_output_tokens": 800,
        "reasoning": {"effort": "medium", "summary": "auto"}, "previous_response_id": "resp_prev", "store": False,
        "background": True, "tools": [{"type": "web_search"}], "stream": True, "text": {"format": {"type": "json_schema", "name": "x"}},
    }
    original = json.loads(json.dumps(doc))
    view = RESPONSES.parse(doc)
    assert (view.temperature, view.tokens_field, view.max_tokens, view.effort) == (0.7, "max_output_tokens", 800, "medium")
    assert view.effort_path == ("reasoning", "effort") and view.json_mode and view.has_tools and view.stream
    reasoning_before = doc["reasoning"]
    assert RESPONSES.patch(doc, Params(temperature=0.6, max_tokens=700, effort="high"))
    assert doc["temperature"] == 0.6 and doc["max_output_tokens"] == 700
    assert doc["reasoning"] == {"effort": "high", "summary": "auto"}
    assert reasoning_before == {"effort": "medium", "summary": "auto"}  # the client's nested object was copied, not changed
    for key in ("previous_response_id", "store", "background", "tools", "input", "text", "stream"):
        assert doc[key] == original[key]


def test_responses_patch_writes_max_output_tokens_when_absent_and_nothing_for_none() -> None:
    doc: dict[str, Any] = {"model": "m", "input": "x"}
    assert not RESPONSES.patch(doc, Params())
    assert RESPONSES.patch(doc, Params(max_tokens=64))
    assert doc == {"model": "m", "input": "x", "max_output_tokens": 64}
    assert RESPONSES.parse(doc).default_tokens_field == "max_output_tokens"


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"model": "m", "max_output_tokens": "10"}, "max_output_tokens"),
        ({"model": "m", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"model": "m", "reasoning": "high"}, "reasoning"),
        ({"model": "m", "temperature": -0.1}, "temperature"),
    ],
)
def test_responses_bad_knobs_are_400(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        RESPONSES.parse(doc)
    assert info.value.status == 400 and info.value.param == param


def test_responses_body_summary() -> None:
    summary = RESPONSES.summarize_body(json.dumps(_response()).encode())
    assert (summary.content, summary.finish_reason, summary.prompt_tokens, summary.completion_tokens) == ("one two three", "stop", 11, 3)
    cut = RESPONSES.summarize_body(json.dumps(_response(status="incomplete", incomplete_details={"reason": "max_output_tokens"})).encode())
    assert cut.finish_reason == "length"
    failed = RESPONSES.summarize_body(json.dumps(_response(status="failed", error={"code": "server_error", "message": "x"})).encode())
    assert failed.error and failed.finish_reason is None
    assert RESPONSES.summarize_body(b"not json").content == ""


def test_responses_body_with_a_function_call_gives_tool_arguments() -> None:
    output = [{"type": "reasoning", "id": "rs_1", "summary": []},
              {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": '{"city":"Paris"}', "status": "completed"}]
    summary = RESPONSES.summarize_body(json.dumps(_response(output=output)).encode())
    assert summary.tool_arguments == ['{"city":"Paris"}'] and summary.finish_reason == "tool_calls"


def test_responses_stream_is_relayed_unchanged_with_usage_and_first_token() -> None:
    final = _response()
    events = responses_events(final, ["one", " two", " three"])
    relay = StreamRelay(strip_usage=False, summarizer=RESPONSES.stream_summarizer())
    out, flags = _relay(events, relay)
    assert out == b"".join(events)
    summary = relay.summary
    assert (summary.content, summary.finish_reason, summary.prompt_tokens, summary.completion_tokens) == ("one two three", "stop", 11, 3)
    assert flags[-1] and not flags[0]
    # TTFT: the flag turns on with the first response.output_text.delta (events[4]), not before.
    by_event = StreamRelay(strip_usage=False, summarizer=RESPONSES.stream_summarizer())
    for i, event in enumerate(events):
        by_event.feed(event)
        assert by_event.first_token == (i >= 4), i


def test_responses_stream_truncated_and_tool_call_and_error_events() -> None:
    cut = _response(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    summarizer = RESPONSES.stream_summarizer()
    for event in responses_events(cut, ["one"]):
        summarizer.feed(event)
    assert summarizer.summary.finish_reason == "length"
    tools = RESPONSES.stream_summarizer()
    assert not tools.feed(sse("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "output_index": 1,
                                                                        "item_id": "fc_1", "delta": '{"a":', "sequence_number": 3}))
    tools.feed(sse("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta", "output_index": 1,
                                                             "item_id": "fc_1", "delta": "1}", "sequence_number": 4}))
    tools.feed(sse("error", {"type": "error", "code": "server_error", "message": "boom", "param": None, "sequence_number": 5}))
    assert tools.summary.tool_arguments == ['{"a":1}'] and tools.summary.error
    assert not tools.feed(b": keep-alive\n\n") and not tools.feed(b"data: {broken\n\n")


# ---- Anthropic Messages ---------------------------------------------------------------------------


def _message(**overrides: Any) -> dict[str, Any]:
    base = anthropic_body(ident="msg_1", model="claude-x", text="one two", input_tokens=21, output_tokens=2, truncated=False)
    base.update(overrides)
    return base


def test_anthropic_view_reads_max_tokens_effort_thinking() -> None:
    doc = {"model": "claude-x", "max_tokens": 4000, "messages": [{"role": "user", "content": "hi"}], "output_config": {"effort": "high"},
           "thinking": {"type": "enabled", "budget_tokens": 2048}, "stream": True}
    view = ANTHROPIC.parse(doc)
    assert (view.max_tokens, view.tokens_field, view.effort, view.effort_path) == (4000, "max_tokens", "high", ("output_config", "effort"))
    assert view.thinking_budget == 2048 and view.temperature is None and view.stream


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"model": "c", "messages": []}, "max_tokens"),
        ({"model": "c", "max_tokens": 10, "temperature": 1.5}, "temperature"),
        ({"model": "c", "max_tokens": 10, "output_config": {"effort": "none"}}, "output_config.effort"),
        ({"model": "c", "max_tokens": 10, "thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
    ],
)
def test_anthropic_bad_knobs_are_400(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(ProxyError) as info:
        ANTHROPIC.parse(doc)
    assert info.value.status == 400 and info.value.param == param


def test_anthropic_patch_adds_no_temperature_the_client_did_not_send() -> None:
    doc: dict[str, Any] = {"model": "c", "max_tokens": 1000, "messages": []}
    assert ANTHROPIC.patch(doc, Params(temperature=0.7, max_tokens=800, effort="medium"))
    assert doc == {"model": "c", "max_tokens": 800, "messages": [], "output_config": {"effort": "medium"}}
    sent: dict[str, Any] = {"model": "c", "max_tokens": 1000, "temperature": 0.9}
    assert ANTHROPIC.patch(sent, Params(temperature=1.2))
    assert sent["temperature"] == 1.0  # Anthropic's range ends at 1


def test_anthropic_patch_keeps_max_tokens_above_the_thinking_budget() -> None:
    doc: dict[str, Any] = {"model": "c", "max_tokens": 3000, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert ANTHROPIC.patch(doc, Params(max_tokens=1500))
    assert doc["max_tokens"] == 2049
    tight: dict[str, Any] = {"model": "c", "max_tokens": 2049, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert not ANTHROPIC.patch(tight, Params(max_tokens=1000))
    assert tight["max_tokens"] == 2049


def test_anthropic_body_summary() -> None:
    summary = ANTHROPIC.summarize_body(json.dumps(_message()).encode())
    assert (summary.content, summary.finish_reason, summary.prompt_tokens, summary.completion_tokens) == ("one two", "stop", 21, 2)
    cut = ANTHROPIC.summarize_body(json.dumps(_message(stop_reason="max_tokens")).encode())
    assert cut.finish_reason == "length"
    tool = _message(content=[{"type": "thinking", "thinking": "hmm", "signature": "s"},
                             {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}}], stop_reason="tool_use")
    tool_summary = ANTHROPIC.summarize_body(json.dumps(tool).encode())
    assert tool_summary.tool_arguments == ['{"city":"Paris"}'] and tool_summary.finish_reason == "tool_calls"
    error = ANTHROPIC.summarize_body(json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}).encode())
    assert error.error


def test_anthropic_stream_is_relayed_unchanged_with_usage() -> None:
    events = anthropic_events(_message(stop_reason="max_tokens"), ["one", " two"])
    relay = StreamRelay(strip_usage=False, summarizer=ANTHROPIC.stream_summarizer())
    out, flags = _relay(events, relay, split=11)
    assert out == b"".join(events)
    summary = relay.summary
    assert (summary.content, summary.finish_reason, summary.prompt_tokens, summary.completion_tokens) == ("one two", "length", 21, 2)
    assert flags[-1] and not flags[0]


def test_anthropic_stream_tool_use_without_arguments_counts_as_an_empty_object() -> None:
    summarizer = ANTHROPIC.stream_summarizer()
    summarizer.feed(sse("content_block_start", {"type": "content_block_start", "index": 1,
                                                "content_block": {"type": "tool_use", "id": "t", "name": "now", "input": {}}}))
    summarizer.feed(sse("content_block_stop", {"type": "content_block_stop", "index": 1}))
    summarizer.feed(sse("content_block_start", {"type": "content_block_start", "index": 2,
                                                "content_block": {"type": "tool_use", "id": "u", "name": "f", "input": {}}}))
    summarizer.feed(sse("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"x":'}}))
    summarizer.feed(sse("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "2}"}}))
    summarizer.feed(sse("content_block_stop", {"type": "content_block_stop", "index": 2}))
    summarizer.feed(sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert summarizer.summary.tool_arguments == ["{}", '{"x":2}'] and summarizer.summary.error


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (404, "not_found_error"), (413, "request_too_large"),
                                              (429, "rate_limit_error"), (502, "api_error"), (504, "api_error")])
def test_anthropic_error_shape(status: int, kind: str) -> None:
    body = msgspec.json.decode(ANTHROPIC.error_body(status, "nope", "whatever"))
    assert body == {"type": "error", "error": {"type": kind, "message": "nope"}}
