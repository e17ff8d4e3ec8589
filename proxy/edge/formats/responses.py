"""OpenAI Responses (`POST /v1/responses`).

Knobs: `temperature`, `max_output_tokens` and `reasoning.effort`; everything else
(`previous_response_id`, `store`, `background`, `tools`, the rest of `reasoning`) is
forwarded untouched. A response is cut when `status` is "incomplete" with
`incomplete_details.reason` "max_output_tokens" (reported as finish reason "length").
Streams are relayed unchanged: the first `response.output_text.delta` is the first
token, and usage (`input_tokens`, `output_tokens`) comes from the terminal
`response.completed` (or `response.incomplete`) event. Event shapes follow the openai
SDK's `types/responses/response_stream_event.py`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from policies.effort import OPENAI_EFFORTS
from policies.records import Params
from proxy.common import ResponseSummary, error_body
from proxy.edge.formats.base import EventSummarizer, KnobView, patch_knobs, read_knobs, read_positive_int
from proxy.edge.formats.chat import openai_error_type

_EFFORT_PATH = ("reasoning", "effort")
_TOKENS = "max_output_tokens"


class _InputDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _OutputDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    input_tokens_details: _InputDetails | None = None
    output_tokens_details: _OutputDetails | None = None


class _Incomplete(msgspec.Struct):
    reason: str | None = None


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _Item(msgspec.Struct):
    type: str = ""
    content: list[_Part] | None = None
    arguments: str | None = None


class _Response(msgspec.Struct):
    status: str | None = None
    incomplete_details: _Incomplete | None = None
    usage: _Usage | None = None
    output: list[_Item] | None = None
    error: dict[str, Any] | None = None


class _Event(msgspec.Struct):
    type: str = ""
    delta: Any = None
    output_index: int = 0
    response: _Response | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_event = msgspec.json.Decoder(_Event).decode


def _read_tokens(doc: dict[str, Any]) -> tuple[str | None, int | None]:
    value = read_positive_int(doc, _TOKENS)
    return (_TOKENS if value is not None else None), value


def _finish(response: _Response) -> str | None:
    if response.status == "completed":
        calls = any(item.type == "function_call" for item in response.output or ())
        return "tool_calls" if calls else "stop"
    if response.status == "incomplete":
        reason = response.incomplete_details.reason if response.incomplete_details is not None else None
        return {"max_output_tokens": "length", "content_filter": "content_filter"}.get(reason or "", reason)
    return None


def _absorb_final(summary: ResponseSummary, response: _Response) -> None:
    """Usage, stop reason and error of a whole response object (not its text)."""
    usage = response.usage
    if usage is not None:
        details_in, details_out = usage.input_tokens_details, usage.output_tokens_details
        summary.openai_usage(usage.input_tokens, usage.output_tokens, details_in.cached_tokens if details_in is not None else None,
                             details_out.reasoning_tokens if details_out is not None else None)
    summary.finish_reason = _finish(response)
    if response.status == "failed" or response.error is not None:
        summary.error = True


class ResponsesStreamSummarizer(EventSummarizer[_Event]):
    """Reads Responses stream events as they are relayed (never changes them)."""

    __slots__ = ()

    def __init__(self, summary: ResponseSummary | None = None) -> None:
        super().__init__(_decode_event, summary)

    def feed(self, event: bytes) -> bool:
        ev = self.event(event)
        if ev is None:
            return False
        summary = self.summary
        kind = ev.type
        if kind == "response.output_text.delta" and isinstance(ev.delta, str):
            return self.text(ev.delta)
        if kind == "response.function_call_arguments.delta" and isinstance(ev.delta, str):
            summary.tool_args.setdefault(ev.output_index, []).append(ev.delta)
        elif kind == "response.refusal.delta":
            summary.refusal = True
        elif kind in ("response.completed", "response.incomplete", "response.failed") and ev.response is not None:
            _absorb_final(summary, ev.response)
        elif kind == "error":
            summary.error = True
        return False


class ResponsesFormat:
    """`/v1/responses`: temperature, max_output_tokens, reasoning.effort."""

    name = "responses"
    upstream_format = "openai"

    def parse(self, doc: dict[str, Any]) -> KnobView:
        text = doc.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
        return read_knobs(
            doc, tokens=_read_tokens, effort_path=_EFFORT_PATH, efforts=OPENAI_EFFORTS, default_tokens_field=_TOKENS,
            json_mode=isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"), has_tools=bool(doc.get("tools")),
        )

    def patch(self, doc: dict[str, Any], knobs: Params) -> bool:
        return patch_knobs(doc, knobs, tokens_field=_TOKENS, effort_path=_EFFORT_PATH)

    def summarize_body(self, raw: bytes) -> ResponseSummary:
        summary = ResponseSummary()
        try:
            response = _decode_response(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return summary
        _absorb_final(summary, response)
        for index, item in enumerate(response.output or ()):
            if item.type == "function_call" and item.arguments is not None:
                summary.tool_args.setdefault(index, []).append(item.arguments)
            for part in item.content or ():
                if part.type == "output_text" and part.text:
                    summary.add_text(part.text)
                elif part.type == "refusal":
                    summary.refusal = True
        return summary

    def stream_summarizer(self, summary: ResponseSummary | None = None) -> ResponsesStreamSummarizer:
        return ResponsesStreamSummarizer(summary)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return error_body(message, openai_error_type(status), code)
