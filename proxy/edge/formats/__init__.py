"""Wire-format adapters and the registry the edge picks them from (see base.py)."""

from __future__ import annotations

from proxy.edge.formats.anthropic import AnthropicFormat
from proxy.edge.formats.base import KnobView, WireFormat
from proxy.edge.formats.chat import ChatFormat, CompletionsFormat
from proxy.edge.formats.responses import ResponsesFormat

CHAT = ChatFormat()
COMPLETIONS = CompletionsFormat()
RESPONSES = ResponsesFormat()
ANTHROPIC = AnthropicFormat()

# The decided paths (after `/v1`), each with the one adapter that reads it.
FORMATS: dict[str, WireFormat] = {
    "/chat/completions": CHAT,
    "/completions": COMPLETIONS,
    "/responses": RESPONSES,
    "/messages": ANTHROPIC,
}


def adapter_for(v1_path: str) -> WireFormat | None:
    """The adapter for a decided path, None for anything passed through untouched."""
    return FORMATS.get(v1_path)


__all__ = ["ANTHROPIC", "CHAT", "COMPLETIONS", "FORMATS", "RESPONSES", "KnobView", "WireFormat", "adapter_for"]
