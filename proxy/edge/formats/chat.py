"""OpenAI chat completions (`POST /v1/chat/completions`) and legacy completions (`POST /v1/completions`).

Field names and response shapes are the ones the edge has always read (proxy/common/summary.py
summarises them, including the usage chunk Thermostat may ask for and strip again), so
these adapters only gather what the edge did inline: validation, the knob view and the
patch. Chat carries `reasoning_effort`; legacy completions has no effort.
"""

from __future__ import annotations

from typing import Any

from policies.effort import OPENAI_EFFORTS
from policies.records import Params
from proxy.common import ResponseSummary, error_body, summarize_body
from proxy.edge.formats.base import KnobView, patch_knobs, read_knobs, read_positive_int
from proxy.edge.sse import StreamSummarizer

_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
_EFFORT_PATH = ("reasoning_effort",)
_JSON_FORMATS = ("json_object", "json_schema")


def _read_tokens(doc: dict[str, Any]) -> tuple[str | None, int | None]:
    """Both fields are validated; the first one present is the client's cap."""
    field: str | None = None
    max_tokens: int | None = None
    for name in _TOKEN_FIELDS:
        value = read_positive_int(doc, name)
        if value is not None and field is None:
            field, max_tokens = name, value
    return field, max_tokens


def openai_error_type(status: int) -> str:
    """The OpenAI `error.type` for a status Thermostat answers itself."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "upstream_error"
    return "invalid_request_error"


class ChatFormat:
    """`/v1/chat/completions`: temperature, max_completion_tokens | max_tokens, reasoning_effort."""

    name = "chat"
    upstream_format = "openai"
    effort_path: tuple[str, ...] = _EFFORT_PATH

    def parse(self, doc: dict[str, Any]) -> KnobView:
        response_format = doc.get("response_format")
        return read_knobs(
            doc, tokens=_read_tokens, effort_path=self.effort_path, efforts=OPENAI_EFFORTS,
            json_mode=isinstance(response_format, dict) and response_format.get("type") in _JSON_FORMATS,
            has_tools=bool(doc.get("tools") or doc.get("functions")),
        )

    def patch(self, doc: dict[str, Any], knobs: Params) -> bool:
        field = "max_tokens"  # the first of the client's fields present, else this one
        for name in _TOKEN_FIELDS:
            if doc.get(name) is not None:
                field = name
                break
        return patch_knobs(doc, knobs, tokens_field=field, effort_path=self.effort_path)

    def summarize_body(self, raw: bytes) -> ResponseSummary:
        return summarize_body(raw)

    def stream_summarizer(self, summary: ResponseSummary | None = None) -> StreamSummarizer | None:
        return None  # StreamRelay's own chat-chunk reading, with usage stripping

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return error_body(message, openai_error_type(status), code)


class CompletionsFormat(ChatFormat):
    """`/v1/completions`: as chat, without reasoning effort or response_format."""

    name = "completions"
    effort_path = ()
