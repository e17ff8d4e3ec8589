"""Response bodies and SSE events in the Responses and Anthropic Messages shapes.

Shared by the simulator (proxy/demo/simulator_server.py) and the tests' fake upstream
(tests/support/fake_upstream.py) so both speak the formats the same way; the shapes
follow the installed SDKs' types (openai `types/responses/response_stream_event.py`,
anthropic `types/raw_message_stream_event.py`) and are checked against those SDKs in
tests/edge/test_wire_formats.py.
"""

from __future__ import annotations

import json
from typing import Any

from proxy.edge import anthropic_error_type


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One named SSE event (both APIs send `event:` lines)."""
    return b"event: " + event.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def prompt_text(body: dict[str, Any]) -> str:
    """The text of the last user turn of a Responses (`input`) or Messages (`messages`) body."""
    source = body.get("input", body.get("messages"))
    if isinstance(source, str):
        return source
    if isinstance(source, list) and source:
        last = source[-1]
        content = last.get("content") if isinstance(last, dict) else last
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


# ---- OpenAI Responses ---------------------------------------------------------------


def responses_body(
    *, ident: str, model: str, text: str, input_tokens: int, output_tokens: int, truncated: bool, created: int, request: dict[str, Any]
) -> dict[str, Any]:
    """A `Response` object: status "completed", or "incomplete" (max_output_tokens) when cut."""
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if truncated else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "error": None,
        "instructions": request.get("instructions"),
        "metadata": request.get("metadata") or {},
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_" + ident[5:],
                "status": "incomplete" if truncated else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if text
        else [],
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": request.get("reasoning"),
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "tool_choice": "auto",
        "tools": request.get("tools") or [],
        "top_p": 1.0,
        "max_output_tokens": request.get("max_output_tokens"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def responses_events(final: dict[str, Any], pieces: list[str]) -> list[bytes]:
    """The stream of one text response: created, in_progress, item/part added, one
    `response.output_text.delta` per piece, the done events, then completed/incomplete."""
    seq = 0
    out: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        out.append(sse(kind, {"type": kind, "sequence_number": seq, **fields}))
        seq += 1

    start = {**final, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    item_id = "msg_" + str(final["id"])[5:]
    text = "".join(pieces)
    item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
    emit("response.output_item.added", output_index=0, item=item)
    emit("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part={"type": "output_text", "text": "", "annotations": []})
    for piece in pieces:
        emit("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=piece, logprobs=[])
    emit("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])
    part = {"type": "output_text", "text": text, "annotations": []}
    emit("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
    emit("response.output_item.done", output_index=0, item={**item, "status": final["status"], "content": [part]})
    emit("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
    return out


# ---- Anthropic Messages ----------------------------------------------------------------


def anthropic_body(*, ident: str, model: str, text: str, input_tokens: int, output_tokens: int, truncated: bool) -> dict[str, Any]:
    """A `Message`: stop_reason "end_turn", or "max_tokens" when cut."""
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens" if truncated else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def anthropic_events(final: dict[str, Any], pieces: list[str]) -> list[bytes]:
    """message_start, content_block_start, ping, one text_delta per piece, content_block_stop,
    message_delta (stop reason, cumulative input and output tokens, as the API sends them and
    LangChain's ChatAnthropic reads them), message_stop."""
    usage = final["usage"]
    start = {**final, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    out = [
        sse("message_start", {"type": "message_start", "message": start}),
        sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
    ]
    out.extend(sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}) for p in pieces)
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": final["stop_reason"], "stop_sequence": None},
                "usage": {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"]},
            },
        )
    )
    out.append(sse("message_stop", {"type": "message_stop"}))
    return out


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
