"""One small interface per wire format, so the edge handles every API the same way.

Thermostat tunes the same knobs (temperature, a max-tokens cap, reasoning effort) on
bodies whose field names and places differ by API, reads usage and the stop reason from
responses shaped differently, and must answer its own errors in a shape the client's SDK
turns into its usual exception. A `WireFormat` hides those differences: the edge parses
a body once into a `KnobView`, asks the decision for `Params`, `patch`es them back under
the client's own field names, and reads the answer through `summarize_body` or a
`StreamSummarizer` into the shared `ResponseSummary` (whose `finish_reason` uses the
OpenAI vocabulary: "stop", "length", "tool_calls", "content_filter", so the automatic
quality rules and the reports need no per-format branches).

Adapters are pure: no I/O, no clock; they raise `ProxyError` (a 400) for bodies
Thermostat cannot tune faithfully.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from policies.records import Params
from proxy.common import ResponseSummary, bad_request
from proxy.edge.sse import StreamSummarizer, event_data

E = TypeVar("E")


class KnobView(msgspec.Struct, frozen=True):
    """The tunable fields of one request body, as the client sent them.

    `tokens_field` is the client's own max-tokens field name (None if it sent none; a
    patch then writes `default_tokens_field`). `effort_path` says where the effort lives
    (`("reasoning_effort",)`, `("reasoning", "effort")`, `("output_config", "effort")`),
    empty for a format without effort.
    """

    model: str
    stream: bool
    temperature: float | None = None
    tokens_field: str | None = None
    max_tokens: int | None = None
    default_tokens_field: str = "max_tokens"
    effort: str | None = None
    effort_path: tuple[str, ...] = ()
    thinking_budget: int | None = None
    json_mode: bool = False
    has_tools: bool = False


class WireFormat(Protocol):
    """One wire format (chat, completions, responses, anthropic messages)."""

    name: str
    upstream_format: str  # the `[[upstreams]] format` this wire format is sent to

    def parse(self, doc: dict[str, Any]) -> KnobView:
        """Validate what Thermostat relies on (400 otherwise) and read the knobs."""
        ...

    def patch(self, doc: dict[str, Any], knobs: Params) -> bool:
        """Write the non-None knobs into `doc` under the client's field names; True if anything changed."""
        ...

    def summarize_body(self, raw: bytes) -> ResponseSummary:
        """Usage, stop reason and quality inputs of a non-streamed 200 body (empty if unreadable)."""
        ...

    def stream_summarizer(self, summary: ResponseSummary | None = None) -> StreamSummarizer | None:
        """A per-stream event reader for `StreamRelay(summarizer=...)`, or None when `StreamRelay`'s
        own chat-chunk reading applies (chat and legacy completions, with usage stripping)."""
        ...

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """An error Thermostat itself answers with, in the shape this format's SDK parses."""
        ...


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def clean_temperature(value: float) -> float:
    """At most 3 decimals, never a float32 artefact like 0.8999999761581421."""
    return round(float(value), 3)


def require_model(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string", "invalid_model", "model")
    return model


def read_temperature(doc: dict[str, Any], high: float = 2.0) -> float | None:
    value = doc.get("temperature")
    if value is None:
        return None
    if not number(value) or not math.isfinite(float(value)):
        raise bad_request("'temperature' must be a number", "invalid_type", "temperature")
    if not 0.0 <= float(value) <= high:
        raise bad_request(f"'temperature' must be between 0 and {high:g}, got {value}", "invalid_value", "temperature")
    return float(value)


def read_positive_int(doc: dict[str, Any], name: str, where: str | None = None) -> int | None:
    value = doc.get(name)
    label = where or name
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{label}' must be an integer", "invalid_type", label)
    if value < 1:
        raise bad_request(f"'{label}' must be at least 1, got {value}", "invalid_value", label)
    return value


def read_stream(doc: dict[str, Any]) -> bool:
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "invalid_type", "stream")
    return stream is True


def read_effort(doc: dict[str, Any], path: tuple[str, ...], levels: tuple[str, ...]) -> str | None:
    """The effort at `path` if the client sent one; a value outside `levels` is a 400."""
    node: Any = doc
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
        if not isinstance(node, dict):
            name = ".".join(path[:-1])
            raise bad_request(f"'{name}' must be an object", "invalid_type", name)
    value = node.get(path[-1])
    if value is None:
        return None
    name = ".".join(path)
    if not isinstance(value, str) or value not in levels:
        raise bad_request(f"'{name}' must be one of {', '.join(levels)}, got {value!r}", "invalid_value", name)
    return value


def patch_temperature(doc: dict[str, Any], temperature: float | None) -> bool:
    if temperature is None:
        return False
    value = clean_temperature(temperature)
    current = doc.get("temperature")
    if number(current) and current == value:
        return False
    doc["temperature"] = value
    return True


def patch_int(doc: dict[str, Any], field: str, value: int | None) -> bool:
    if value is None or doc.get(field) == int(value):
        return False
    doc[field] = int(value)
    return True


def patch_effort(doc: dict[str, Any], path: tuple[str, ...], effort: str | None) -> bool:
    """Set the effort at `path`, creating (copies of) the enclosing objects: the client's
    nested dicts are copied before the write so a caller holding the original sees no change."""
    if effort is None or not path:
        return False
    node = doc
    for key in path[:-1]:
        child = node.get(key)
        child = dict(child) if isinstance(child, dict) else {}
        node[key] = child
        node = child
    if node.get(path[-1]) == effort:
        return False
    node[path[-1]] = effort
    return True


def read_knobs(
    doc: dict[str, Any],
    *,
    tokens: Callable[[dict[str, Any]], tuple[str | None, int | None]],
    effort_path: tuple[str, ...],
    efforts: tuple[str, ...],
    temperature_high: float = 2.0,
    default_tokens_field: str = "max_tokens",
    json_mode: bool = False,
    has_tools: bool = False,
) -> KnobView:
    """The knobs every format has, validated in one order (model, temperature, max tokens, stream, effort),
    so that a body with several faults gets the same 400 whichever API it was sent to.

    `tokens` reads the format's max-tokens field(s): (the client's field name or None, its value).
    """
    model = require_model(doc)
    temperature = read_temperature(doc, high=temperature_high)
    field, max_tokens = tokens(doc)
    stream = read_stream(doc)
    effort = read_effort(doc, effort_path, efforts) if effort_path else None
    return KnobView(
        model=model,
        stream=stream,
        temperature=temperature,
        tokens_field=field,
        max_tokens=max_tokens,
        default_tokens_field=default_tokens_field,
        effort=effort,
        effort_path=effort_path,
        json_mode=json_mode,
        has_tools=has_tools,
    )


def patch_knobs(doc: dict[str, Any], knobs: Params, *, tokens_field: str, effort_path: tuple[str, ...]) -> bool:
    """Temperature, max tokens and effort written under the client's names; True if anything changed."""
    changed = patch_temperature(doc, knobs.temperature)
    changed = patch_int(doc, tokens_field, knobs.max_tokens) or changed
    return patch_effort(doc, effort_path, knobs.effort) or changed


class EventSummarizer(Generic[E]):
    """What every typed stream reader shares: decoding one relayed event, and telling the first token.

    A subclass's `feed` calls `event` (None for comments, pings, `[DONE]` and anything
    unreadable: a summary never fails the relay) and `text` for each piece of answer text.
    """

    __slots__ = ("summary", "_seen_text", "_decode")

    def __init__(self, decode: Callable[[bytes], E], summary: ResponseSummary | None = None) -> None:
        self.summary = summary if summary is not None else ResponseSummary()
        self._seen_text = False
        self._decode = decode

    def event(self, raw: bytes) -> E | None:
        payload = event_data(raw)
        if payload is None or payload == b"[DONE]":
            return None
        try:
            return self._decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def text(self, piece: str) -> bool:
        """Collect answer text; True for the first piece (the time to first token is taken there)."""
        self.summary.add_text(piece)
        first = not self._seen_text
        self._seen_text = True
        return first


def json_error(envelope: dict[str, Any]) -> bytes:
    return msgspec.json.encode(envelope)
