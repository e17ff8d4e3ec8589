"""What Thermostat reads from an upstream's answer: usage, finish reason, text and tool calls.

Below the edge because rooms other than the edge read it too: the edge fills a
`ResponseSummary` while relaying, the decision room turns it into an `Outcome`, and the
learning room's answer check reads its text and tool calls.
"""

from __future__ import annotations

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


decode_chat_body = msgspec.json.Decoder(_Body).decode
"""An OpenAI chat or completions body (or one stream chunk) as far as a summary reads it."""


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
        summary.absorb(decode_chat_body(raw), streaming=False)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return summary
