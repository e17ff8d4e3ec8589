"""Anthropic Messages (`POST /v1/messages`), to upstreams declared `format = "anthropic"`.

Knobs: `max_tokens` (required by the API, so always present), `output_config.effort`
(low … max) and `temperature` only where the client sent one (range 0–1; the current
SDK no longer has the parameter, older clients may still send it). With extended
thinking (`thinking.type = "enabled"`) the API requires `max_tokens` above
`thinking.budget_tokens`, so a patch never lowers it to the budget or below.

Streams are relayed unchanged; usage is `message_start.message.usage.input_tokens` plus
the cumulative `message_delta.usage.output_tokens`; the first `text_delta` is the first
token. `stop_reason` maps to the OpenAI vocabulary ("max_tokens" -> "length"). Errors
Thermostat makes use Anthropic's `{"type": "error", "error": {...}}` so the SDK raises
its typed exceptions (it picks the class by HTTP status). Event shapes follow the
anthropic SDK's `types/raw_message_stream_event.py`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from policies.effort import ANTHROPIC_EFFORTS
from policies.records import Params
from proxy.common import ResponseSummary, bad_request
from proxy.edge.formats.base import (
    EventSummarizer,
    KnobView,
    json_error,
    number,
    patch_effort,
    patch_int,
    patch_temperature,
    read_knobs,
    read_positive_int,
)

_EFFORT_PATH = ("output_config", "effort")

STOP_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


def _absorb_usage(summary: ResponseSummary, usage: _Usage) -> None:
    """Counts present in `usage` (a stream's `message_delta` repeats some, cumulatively). Anthropic's
    `input_tokens` leaves the cache reads and writes out; they are billed at their own prices."""
    summary.cache_apart = True
    if usage.input_tokens is not None:
        summary.prompt_tokens = usage.input_tokens
    if usage.output_tokens is not None:
        summary.completion_tokens = usage.output_tokens
    if usage.cache_read_input_tokens is not None:
        summary.cache_read_tokens = usage.cache_read_input_tokens
    if usage.cache_creation_input_tokens is not None:
        summary.cache_write_tokens = usage.cache_creation_input_tokens


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    input: Any = None


class _Message(msgspec.Struct):
    type: str = ""
    content: list[_Block] | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = 0
    message: _Message | None = None
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None


_decode_message = msgspec.json.Decoder(_Message).decode
_decode_event = msgspec.json.Decoder(_Event).decode
_encode = msgspec.json.Encoder().encode


def _read_tokens(doc: dict[str, Any]) -> tuple[str | None, int | None]:
    """`max_tokens` is required by the Messages API."""
    max_tokens = read_positive_int(doc, "max_tokens")
    if max_tokens is None:
        raise bad_request("'max_tokens' is required", "missing_required_parameter", "max_tokens")
    return "max_tokens", max_tokens


def _finish(stop_reason: str | None) -> str | None:
    return None if stop_reason is None else STOP_REASONS.get(stop_reason, stop_reason)


class AnthropicStreamSummarizer(EventSummarizer[_Event]):
    """Reads Messages stream events as they are relayed (never changes them)."""

    __slots__ = ("_tool_blocks",)

    def __init__(self, summary: ResponseSummary | None = None) -> None:
        super().__init__(_decode_event, summary)
        self._tool_blocks: set[int] = set()

    def feed(self, event: bytes) -> bool:
        ev = self.event(event)
        if ev is None:
            return False
        summary = self.summary
        kind = ev.type
        if kind == "content_block_delta" and ev.delta is not None:
            delta = ev.delta
            if delta.type == "text_delta" and delta.text is not None:
                return self.text(delta.text)
            if delta.type == "input_json_delta" and delta.partial_json:
                summary.tool_args.setdefault(ev.index, []).append(delta.partial_json)
        elif kind == "message_start" and ev.message is not None and ev.message.usage is not None:
            summary.prompt_tokens = ev.message.usage.input_tokens
            summary.completion_tokens = ev.message.usage.output_tokens
            _absorb_usage(summary, ev.message.usage)
        elif kind == "content_block_start" and ev.content_block is not None and ev.content_block.type == "tool_use":
            self._tool_blocks.add(ev.index)
            summary.tool_args.setdefault(ev.index, [])
        elif kind == "content_block_stop" and ev.index in self._tool_blocks:
            if not summary.tool_args.get(ev.index):
                summary.tool_args[ev.index] = ["{}"]  # a tool called without arguments streams no delta
        elif kind == "message_delta":
            if ev.usage is not None:
                _absorb_usage(summary, ev.usage)  # cumulative counts
            if ev.delta is not None and ev.delta.stop_reason is not None:
                summary.finish_reason = _finish(ev.delta.stop_reason)
        elif kind == "error":
            summary.error = True
        return False


class AnthropicFormat:
    """`/v1/messages`: max_tokens, output_config.effort, temperature (only if sent)."""

    name = "anthropic"
    upstream_format = "anthropic"

    def parse(self, doc: dict[str, Any]) -> KnobView:
        output_config = doc.get("output_config")
        fmt = output_config.get("format") if isinstance(output_config, dict) else None
        view = read_knobs(
            doc, tokens=_read_tokens, effort_path=_EFFORT_PATH, efforts=ANTHROPIC_EFFORTS, temperature_high=1.0,
            json_mode=isinstance(fmt, dict) and fmt.get("type") == "json_schema", has_tools=bool(doc.get("tools")),
        )
        budget = thinking_budget(doc)
        return view if budget is None else msgspec.structs.replace(view, thinking_budget=budget)

    def patch(self, doc: dict[str, Any], knobs: Params) -> bool:
        changed = False
        if knobs.temperature is not None and number(doc.get("temperature")):
            changed = patch_temperature(doc, min(1.0, max(0.0, knobs.temperature)))
        if knobs.max_tokens is not None:
            value = int(knobs.max_tokens)
            budget = thinking_budget(doc)
            current = doc.get("max_tokens")
            if budget is not None and value <= budget:
                # Never at or below the thinking budget (the API refuses it); never above the client's own cap.
                value = min(budget + 1, current) if isinstance(current, int) else budget + 1
            changed = patch_int(doc, "max_tokens", value) or changed
        return patch_effort(doc, _EFFORT_PATH, knobs.effort) or changed

    def summarize_body(self, raw: bytes) -> ResponseSummary:
        summary = ResponseSummary()
        try:
            message = _decode_message(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return summary
        if message.type == "error":
            summary.error = True
            return summary
        if message.usage is not None:
            summary.prompt_tokens = message.usage.input_tokens
            summary.completion_tokens = message.usage.output_tokens
            _absorb_usage(summary, message.usage)
        summary.finish_reason = _finish(message.stop_reason)
        for index, block in enumerate(message.content or ()):
            if block.type == "text" and block.text:
                summary.add_text(block.text)
            elif block.type == "tool_use":
                summary.tool_args[index] = [_encode(block.input if block.input is not None else {}).decode()]
        return summary

    def stream_summarizer(self, summary: ResponseSummary | None = None) -> AnthropicStreamSummarizer:
        return AnthropicStreamSummarizer(summary)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """`code` has no place in Anthropic's shape; the message carries the meaning."""
        return json_error({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})


def thinking_budget(doc: dict[str, Any]) -> int | None:
    """`thinking.budget_tokens` when extended thinking is enabled, else None."""
    thinking = doc.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise bad_request("'thinking.budget_tokens' must be an integer", "invalid_type", "thinking.budget_tokens")
    return budget
