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

from proxy.common import ResponseSummary, decode_chat_body

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
            body = decode_chat_body(payload)
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
