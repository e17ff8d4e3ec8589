"""Reading what the upstream answered, without changing what the client sees.

Streaming responses are split into SSE events so each complete event is relayed at
once (no buffering beyond one event) while usage, finish_reason and the generated
text are collected for the outcome record. When Thermostat itself asked for
`stream_options.include_usage`, the extra usage chunk and the `"usage":null` fields
the upstream adds to every chunk are removed, so the client sees the stream it
would have seen.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from policies.pricing import TokenUsage


class _Function(msgspec.Struct):
    arguments: str | None = None
    name: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None
    delta: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Body(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: dict[str, object] | None = None


_decode_body = msgspec.json.Decoder(_Body).decode


TEXT_BLOCK = 64
"""Answer-text pieces joined into one string at a time (ResponseSummary.add_text)."""


class ResponseSummary:
    """What the outcome record and the quality signal need from one response."""

    __slots__ = ("prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cache_apart",
                 "finish_reason", "content_parts", "_blocks", "tool_args", "tool_names", "refusal", "error")

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # The cost's details, as the wire format reports them: cached input read and written,
        # reasoning tokens (part of completion_tokens). `cache_apart`: the format's input count
        # leaves the cached tokens out (Anthropic), where OpenAI's includes them.
        self.cache_read_tokens: int | None = None
        self.cache_write_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.cache_apart = False
        self.finish_reason: str | None = None
        self.content_parts: list[str] = []  # the latest pieces, fewer than TEXT_BLOCK
        self._blocks: list[str] = []  # earlier pieces, joined TEXT_BLOCK at a time
        self.tool_args: dict[int, list[str]] = {}
        self.tool_names: dict[int, str] = {}  # for validating arguments against the named tool's schema
        self.refusal: bool = False
        self.error: bool = False

    @property
    def content(self) -> str:
        return "".join(self._blocks) + "".join(self.content_parts)

    def openai_usage(self, prompt: int, completion: int, cached: int | None, reasoning: int | None) -> None:
        """Usage as OpenAI's formats count it: the input includes its cached part, the output its reasoning."""
        self.prompt_tokens, self.completion_tokens = prompt, completion
        self.cache_read_tokens, self.reasoning_tokens = cached, reasoning

    def usage(self) -> TokenUsage | None:
        """The usage a price applies to (`policies.pricing`), or None when the upstream reported none."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        read, write = self.cache_read_tokens or 0, self.cache_write_tokens or 0
        total_in = (self.prompt_tokens or 0) + (read + write if self.cache_apart else 0)
        return TokenUsage(input_tokens=total_in, output_tokens=self.completion_tokens or 0, cache_read_tokens=read,
                          cache_write_tokens=write, reasoning_tokens=self.reasoning_tokens or 0)

    def add_text(self, piece: str) -> None:
        """A piece of the answer's text. A stream brings it a few tokens at a time, and each
        piece kept as its own str costs ~50 bytes of header: for a 1,000-token answer that was
        ~10 KB per open stream on average, held for seconds by every concurrent stream. Joining
        every TEXT_BLOCK pieces keeps it to a few hundred bytes, in linear time."""
        parts = self.content_parts
        parts.append(piece)
        if len(parts) >= TEXT_BLOCK:
            self._blocks.append("".join(parts))
            parts.clear()

    def clear_text(self) -> None:
        self.content_parts.clear()
        self._blocks.clear()

    @property
    def tool_arguments(self) -> list[str]:
        return ["".join(parts) for _, parts in sorted(self.tool_args.items())]

    @property
    def tool_calls(self) -> list[tuple[str, str]]:
        """(tool name, arguments) per call, in index order."""
        return [(self.tool_names.get(i, ""), "".join(parts)) for i, parts in sorted(self.tool_args.items())]

    def absorb(self, body: _Body, streaming: bool) -> None:
        if body.error is not None:
            self.error = True
        usage = body.usage
        if usage is not None:
            prompt, completion = usage.prompt_tokens_details, usage.completion_tokens_details
            self.openai_usage(usage.prompt_tokens, usage.completion_tokens, prompt.cached_tokens if prompt is not None else None,
                              completion.reasoning_tokens if completion is not None else None)
        for choice in body.choices or ():
            if choice.index != 0:
                continue  # n > 1: the first choice stands for the response
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
            msg = choice.delta if streaming else choice.message
            if choice.text is not None:
                self.add_text(choice.text)
            if msg is None:
                continue
            if msg.content:
                self.add_text(msg.content)
            if msg.refusal:
                self.refusal = True
            for call in msg.tool_calls or ():
                if call.function is not None and call.function.name:
                    self.tool_names[call.index] = call.function.name
                if call.function is not None and call.function.arguments:
                    self.tool_args.setdefault(call.index, []).append(call.function.arguments)


def summarize_body(raw: bytes) -> ResponseSummary:
    """Summary of a non-streaming JSON response; an unparseable body yields an empty summary."""
    summary = ResponseSummary()
    try:
        summary.absorb(_decode_body(raw), streaming=False)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return summary


_USAGE_NULLS = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')


class StreamSummarizer(Protocol):
    """Reads one wire format's stream event by event (proxy/edge/formats); never changes it."""

    summary: ResponseSummary

    def feed(self, event: bytes) -> bool:
        """Absorb one complete SSE event; True if it carried the first generated token."""
        ...


class StreamRelay:
    """Incremental SSE splitter: feed upstream bytes, get back bytes to send now.

    Without a `summarizer` the events are read as chat/completions chunks (and the usage
    Thermostat asked for may be stripped); with one, every event is relayed unchanged and
    the summarizer reads it. `first_token` turns true once an event that carries the first
    generated token has been returned by `feed` (for chat chunks: the first event relayed).
    """

    __slots__ = ("summary", "strip_usage", "_buffer", "saw_done", "events", "max_event_bytes", "max_total_bytes", "read_bytes",
                 "unsummarised", "summarizer", "first_token")

    def __init__(self, strip_usage: bool, max_event_bytes: int | None = None, summarizer: StreamSummarizer | None = None,
                 max_total_bytes: int | None = None) -> None:
        self.summarizer = summarizer
        self.summary = summarizer.summary if summarizer is not None else ResponseSummary()
        self.first_token = False
        self.strip_usage = strip_usage
        self._buffer = b""
        self.saw_done = False
        self.events = 0
        # An event that never ends would otherwise be buffered without bound: past this
        # size the rest of the stream is relayed as it comes, no longer read.
        self.max_event_bytes = max_event_bytes
        # The answer's text is kept for the outcome, so a stream that never ends would grow it
        # without bound: past this many bytes read, the text is dropped and the rest relayed
        # unread, as a non-streamed body above `max_response_bytes` is.
        self.max_total_bytes = max_total_bytes
        self.read_bytes = 0
        self.unsummarised = False

    def feed(self, chunk: bytes) -> bytes:
        if self.unsummarised:
            return chunk
        self.read_bytes += len(chunk)
        if self.max_total_bytes is not None and self.read_bytes > self.max_total_bytes:
            self.unsummarised = True
            self.summary.clear_text()
            self.summary.tool_args.clear()
            rest, self._buffer = self._buffer + chunk, b""
            return rest
        data = self._buffer + chunk if self._buffer else chunk
        out: list[bytes] = []
        start = 0
        # Nearly every upstream ends events with a bare "\n\n": one memchr for a CR per read
        # spares a second search per event (this runs for every relayed chunk).
        has_cr = b"\r" in data
        while True:
            if has_cr:
                end, sep_len = _find_event_end(data, start)
            else:
                end, sep_len = data.find(b"\n\n", start), 2
            if end < 0:
                break
            event = data[start : end + sep_len]
            start = end + sep_len
            kept = self._on_event(event)
            if kept:
                out.append(kept)
        self._buffer = data[start:]
        if self.max_event_bytes is not None and len(self._buffer) > self.max_event_bytes:
            self.unsummarised = True
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _on_event(self, event: bytes) -> bytes | None:
        self.events += 1
        if self.summarizer is not None:
            if self.summarizer.feed(event):
                self.first_token = True
            return event
        kept = self._on_chat_event(event)
        if kept:
            self.first_token = True
        return kept

    def _on_chat_event(self, event: bytes) -> bytes | None:
        payload = event_data(event)
        if payload is None:
            return event
        if payload == b"[DONE]":
            self.saw_done = True
            return event
        try:
            body = _decode_body(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return event
        self.summary.absorb(body, streaming=True)
        if not self.strip_usage:
            return event
        if body.usage is not None and not body.choices:
            return None  # the usage chunk Thermostat asked for; the client did not
        for pattern in _USAGE_NULLS:
            if pattern in event:
                return event.replace(pattern, b"", 1)
        return event


def _find_event_end(data: bytes, start: int) -> tuple[int, int]:
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    if lf >= 0:
        return lf, 2
    return -1, 0


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` lines of one event, or None if it has none (a comment, a ping)."""
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2 and b"\r" not in event:
        return event[6:-2]  # the usual event, one `data: ` line and its blank line: no split
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    return b"\n".join(parts)
