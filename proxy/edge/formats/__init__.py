"""Wire-format adapters and the registry the edge picks them from (see base.py)."""

from __future__ import annotations

from proxy.common import ProxyError
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


def wire_of(v1_path: str) -> str:
    """The upstream format a path after `/v1` belongs to (`/messages/count_tokens` is Anthropic's)."""
    return "anthropic" if v1_path == "/messages" or v1_path.startswith("/messages/") else "openai"


def own_error(path: str, exc: ProxyError, fmt: WireFormat | None = None) -> bytes:
    """Thermostat's own error answer on `path` (the request path as sent, `/v1/...`), in the
    shape of that path's format: Anthropic's `{"type": "error", ...}` on `/v1/messages` and
    below (its SDK then raises the typed exception for the status), else OpenAI's, which keeps
    the `ProxyError`'s own type, code and `param`. `fmt`: the adapter, when already known."""
    shape = fmt if fmt is not None else (ANTHROPIC if path.startswith("/v1/") and wire_of(path[3:]) == "anthropic" else None)
    if shape is None or shape.upstream_format == "openai":
        return exc.body()
    return shape.error_body(exc.status, exc.message, exc.code)


__all__ = ["ANTHROPIC", "CHAT", "COMPLETIONS", "FORMATS", "RESPONSES", "KnobView", "WireFormat", "adapter_for", "own_error", "wire_of"]
