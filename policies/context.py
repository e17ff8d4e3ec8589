"""Request context: what a decision may depend on, extracted once from the request body.

Pure functions only (no I/O, no clock).  Four views of one request:

* `build_context(body, ...)` -> `RequestContext` (the record that crosses rooms).
* `context_bucket(ctx)` -> the *discrete* key the tabular policies (Thompson) use.
  It is deliberately coarse so that each bucket sees enough traffic to learn:
  ``task_type | model@upstream | endpoint | prompt-length bin | json | tools``.
* `context_fingerprint(ctx)` -> a stable signed 64-bit integer of the bucket
  (blake2b, not Python's salted `hash()`), so the same bucket has the same id in
  every process and fits a PostgreSQL BIGINT.
* `numeric_features(ctx)` -> the fixed, normalised numeric vector LinUCB crosses with
  the arm features, and `context_features(ctx)` -> the context as a JSON-able dict for logs.

Token estimate (`estimate_prompt_tokens`): deliberately conservative, because the
budget guard reserves tokens with it before the upstream reports real usage.
English BPE tokenisers average ~4 characters per token; we divide characters by 3
(rounding up), add 4 tokens of framing per chat message (role, separators), 3 for
the reply priming, and count tool/function definitions and tool-call arguments as
JSON text.  Token-id prompts on /v1/completions are counted exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from policies.records import RequestContext

CHARS_PER_TOKEN = 3
"""Divisor for characters -> tokens; 3 over-estimates typical English (≈4 chars/token)."""
PER_MESSAGE_OVERHEAD = 4
"""Framing tokens per chat message (role marker, separators)."""
REPLY_PRIMING = 3
"""Tokens the chat template adds to prime the assistant reply."""
IMAGE_PART_TOKENS = 85
"""Flat charge for an image content part (the low-detail price); we never fetch images."""

PROMPT_BIN_EDGES: tuple[int, ...] = (2048, 8192, 32768)
"""Prompt-length bins for the bucket: <2k, <8k, <32k, >=32k estimated tokens (factor 4 apart)."""

NUMERIC_FEATURES: tuple[str, ...] = (
    "bias",
    "log_prompt_tokens",
    "log_message_count",
    "has_tools",
    "json_mode",
    "stream",
    "client_temperature",
)
"""Layout of `numeric_features`."""
LOG_PROMPT_CAP = 131_072  # prompt tokens that map to 1.0 on the log scale
LOG_MESSAGES_CAP = 64  # messages that map to 1.0 on the log scale
TEMPERATURE_SCALE = 2.0  # OpenAI temperatures live in [0, 2]


def _text_chars(value: Any) -> tuple[int, int]:
    """(characters of text, number of image parts) in a message `content` of any valid shape."""
    if value is None:
        return 0, 0
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, list):
        chars = 0
        images = 0
        for part in value:
            if isinstance(part, str):
                chars += len(part)
            elif type(part) is dict or isinstance(part, Mapping):  # decoded JSON: a dict, without the ABC check
                kind = part.get("type")
                if kind in ("image_url", "input_image", "image"):
                    images += 1
                elif isinstance(part.get("text"), str):
                    chars += len(part["text"])
                else:
                    chars += len(_json_text(part))
        return chars, images
    return len(_json_text(value)), 0


def _json_text(value: Any) -> str:
    """Compact JSON of an arbitrary decoded value (never raises: falls back to repr)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _chars_to_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Conservative prompt-token estimate of a chat, completions, Responses (`input`,
    `instructions`) or Anthropic Messages (`system`) body (see module doc)."""
    tokens = 0
    messages = body.get("messages")
    given = body.get("input")  # Responses: a string (like a prompt) or a list of items (like messages)
    if messages is None and isinstance(given, list):
        messages = given
    elif isinstance(given, str):
        tokens += _chars_to_tokens(len(given))
    for key in ("system", "instructions"):
        value = body.get(key)
        if value is not None:  # None counts 0 characters
            chars, _ = _text_chars(value)
            tokens += _chars_to_tokens(chars)
    if isinstance(messages, list):
        tokens += REPLY_PRIMING
        for message in messages:
            tokens += PER_MESSAGE_OVERHEAD
            if type(message) is not dict and not isinstance(message, Mapping):  # a dict skips the ABC check
                tokens += _chars_to_tokens(len(_json_text(message)))
                continue
            content = message.get("content")
            if type(content) is str:  # the common shape, as `_text_chars` counts it
                chars, images = len(content), 0
            else:
                chars, images = _text_chars(content)
            name = message.get("name")
            if isinstance(name, str):
                chars += len(name)
            tool_calls = message.get("tool_calls")
            if tool_calls:
                chars += len(_json_text(tool_calls))
            function_call = message.get("function_call")
            if function_call:
                chars += len(_json_text(function_call))
            tokens += _chars_to_tokens(chars) + images * IMAGE_PART_TOKENS
    prompt = body.get("prompt")
    if prompt is not None:
        tokens += _prompt_tokens(prompt)
    for key in ("tools", "functions"):
        defs = body.get(key)
        if defs:
            tokens += _chars_to_tokens(len(_json_text(defs)))
    return int(tokens)


def _prompt_tokens(prompt: Any) -> int:
    """Tokens of a /v1/completions `prompt`: string, list of strings, token ids or lists of ids."""
    if isinstance(prompt, str):
        return _chars_to_tokens(len(prompt))
    if isinstance(prompt, list):
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return len(prompt)
        return sum(_prompt_tokens(p) for p in prompt)
    return _chars_to_tokens(len(_json_text(prompt)))


def _token_cap(body: Mapping[str, Any]) -> int | None:
    """The client's token cap as sent; through float, 2**63 - 1 would become 2**63.
    `max_output_tokens` is the Responses API's name for it."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if type(value) is int:
            return value
        as_float = _number(value)
        if as_float is not None:
            return int(as_float)
    return None


def _number(value: Any) -> float | None:
    """A finite JSON number as float, else None (bools are not numbers here)."""
    if type(value) is float:  # the common case, as below
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    as_float = float(value)
    return as_float if math.isfinite(as_float) else None


def build_context(body: Mapping[str, Any], *, task_type: str, endpoint: str, upstream: str = "", effort: str | None = None) -> RequestContext:
    """Extract the `RequestContext` of a decoded request body.

    Never raises on odd-but-valid bodies: every field falls back to a neutral value.
    `max_completion_tokens` (the newer OpenAI name) wins over `max_tokens` when both
    are present, because that is what the upstream honours. `endpoint` is the wire
    format (chat, completions, responses, anthropic), so it is both a feature and part
    of the bucket key; `effort` is the client's reasoning effort as the format's adapter
    read it (proxy/edge/formats), None when the request carries none.
    """
    if type(body) is not dict and not isinstance(body, Mapping):  # a dict skips the ABC check
        body = {}
    model = body.get("model")
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list):
        messages = body["input"]
    tools = body.get("tools") or body.get("functions")
    response_format = body.get("response_format")
    # Responses: `text.format`; Anthropic: `output_config.format`.
    for outer in ("text", "output_config"):
        nested = body.get(outer)
        if response_format is None and nested is not None and isinstance(nested, Mapping):
            response_format = nested.get("format")
    json_mode = response_format is not None and isinstance(response_format, Mapping) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )
    temperature = _number(body.get("temperature"))
    return RequestContext(
        task_type=(task_type or "default").strip().lower() or "default",
        model=model if isinstance(model, str) else "",
        endpoint=endpoint,
        prompt_tokens_est=estimate_prompt_tokens(body),
        message_count=len(messages) if isinstance(messages, list) else (1 if "prompt" in body or "input" in body else 0),
        has_tools=bool(tools),
        json_mode=bool(json_mode),
        stream=bool(body.get("stream") is True),
        client_temperature=temperature,
        client_max_tokens=_token_cap(body),
        upstream=upstream,
        client_effort=effort,
    )


def prompt_bin(prompt_tokens: int) -> int:
    """Index of the prompt-length bin (0 .. len(PROMPT_BIN_EDGES))."""
    for index, edge in enumerate(PROMPT_BIN_EDGES):
        if prompt_tokens < edge:
            return index
    return len(PROMPT_BIN_EDGES)


def model_group(ctx: RequestContext) -> str:
    """`<model>@<upstream>` (just the model when no upstream is known): what statistics are kept per.

    The same model name on two upstreams can be two different models (a provider and a
    self-hosted fine-tune; a deployment that moved to a new snapshot), so what is learnt
    about one must not steer the other; a model under a new name starts fresh anyway.
    `ctx.model` is already the bounded name (`other:<pattern>` past the cap) and upstream
    names come from the configuration, so the key stays bounded.  "|" is a separator of
    the keys built from this, so it is replaced.
    """
    group = f"{ctx.model}@{ctx.upstream}" if ctx.upstream else ctx.model
    return group.replace("|", "/")


def context_bucket(ctx: RequestContext) -> str:
    """Discrete key of the context: task|model@upstream|endpoint|p<bin>|json|tools.

    Stream and the client's own parameters are left out on purpose: they do not
    change which (temperature, max_tokens) is best, and every extra dimension
    splits the data a tabular posterior learns from.
    """
    upstream = ctx.upstream
    group = f"{ctx.model}@{upstream}" if upstream else ctx.model  # `model_group`, inlined: this runs several times a request
    if "|" in group:
        group = group.replace("|", "/")
    tokens = ctx.prompt_tokens_est
    if tokens < PROMPT_BIN_EDGES[0]:  # `prompt_bin`'s first bin, where nearly every prompt falls
        return f"{ctx.task_type}|{group}|{ctx.endpoint}|p0|j{int(ctx.json_mode)}|t{int(ctx.has_tools)}"
    return f"{ctx.task_type}|{group}|{ctx.endpoint}|p{prompt_bin(tokens)}|j{int(ctx.json_mode)}|t{int(ctx.has_tools)}"


def stable_hash64(text: str) -> int:
    """Signed 64-bit blake2b digest of `text`: identical in every process, fits a BIGINT."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# bucket -> its fingerprint: a pure function, computed once per bucket (one per decision otherwise).
# Bounded: past the cap, new buckets are hashed each time and not kept.
_FINGERPRINTS: dict[str, int] = {}
_MAX_FINGERPRINTS = 4096


def context_fingerprint(ctx: RequestContext) -> int:
    """Stable signed 64-bit id of the discrete part of the context (its bucket)."""
    bucket = context_bucket(ctx)
    found = _FINGERPRINTS.get(bucket)
    if found is None:
        found = stable_hash64(bucket)
        if len(_FINGERPRINTS) < _MAX_FINGERPRINTS and len(bucket) <= 512:
            _FINGERPRINTS[bucket] = found
    return found


def _log_scaled(value: float, cap: float) -> float:
    return min(1.0, math.log1p(max(0.0, value)) / math.log1p(cap))


def numeric_features(ctx: RequestContext) -> np.ndarray:
    """Fixed, normalised context features for LinUCB, in the order of `NUMERIC_FEATURES` (each in [0, 1]):

      0 bias (1.0)
      1 log1p(prompt tokens) / log1p(131072)
      2 log1p(message count) / log1p(64)
      3 has tools (0/1)
      4 json response format (0/1)
      5 stream (0/1)
      6 client temperature / 2 (0 when the client sent none)

    No task-type slots: LinUCB keeps one model per task type (policies/linucb.py), so task
    types cannot collide in a hashed slot however many there are.
    """
    x = np.zeros(len(NUMERIC_FEATURES), dtype=np.float64)
    x[0] = 1.0
    x[1] = _log_scaled(ctx.prompt_tokens_est, LOG_PROMPT_CAP)
    x[2] = _log_scaled(ctx.message_count, LOG_MESSAGES_CAP)
    x[3] = float(ctx.has_tools)
    x[4] = float(ctx.json_mode)
    x[5] = float(ctx.stream)
    if ctx.client_temperature is not None:
        x[6] = min(1.0, max(0.0, ctx.client_temperature / TEMPERATURE_SCALE))
    return x


def context_features(ctx: RequestContext) -> dict[str, Any]:
    """JSON-able dict of the context for the `context_features` log column."""
    features: dict[str, Any] = msgspec.to_builtins(ctx)
    features["prompt_bin"] = prompt_bin(ctx.prompt_tokens_est)
    features["bucket"] = context_bucket(ctx)
    return features
