"""Bounds on client JSON that msgspec does not enforce: depth, integer size, duplicate keys.

Each check has a fast path that costs a few byte scans on a typical body and falls
back to an exact check only when the fast path cannot rule the problem out, because
they run on every decided request before anything is forwarded.

- Depth: msgspec raises `RecursionError` somewhere near 1,000 levels (deeper input
  used to surface as a 500); the edge bounds it far lower, at `MAX_JSON_DEPTH`.
- Integers: msgspec decodes integers of any size into Python ints, which later fail in
  msgpack (the decision registry) or lose precision through float. Top-level integers
  must fit a signed 64-bit integer.
- Duplicate keys: msgspec keeps the last value, an upstream may keep the first. When the
  decision changes nothing the client's own bytes are forwarded, so a repeated top-level
  field that Thermostat reads would let the upstream see a value that was never
  validated (`{"temperature":5,"temperature":0.5}`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

MAX_JSON_DEPTH = 64
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Top-level fields Thermostat reads or writes in a decided body.
WATCHED_KEYS: tuple[str, ...] = (
    "model",
    "messages",
    "prompt",
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "user",
    "tools",
    "functions",
    "response_format",
    # Responses and Anthropic Messages (proxy/edge/formats): knobs and what the context reads.
    "max_output_tokens",
    "reasoning_effort",
    "reasoning",
    "output_config",
    "thinking",
    "input",
    "instructions",
    "system",
    "text",
)
_QUOTED = {key: b'"' + key.encode() + b'"' for key in WATCHED_KEYS}

# A `\u00XX` escape of a printable ASCII character: the only way to spell a watched key
# without its plain bytes (`"temp\u0065rature"`). JSON encoders rarely write these
# (Go's escapes `<`, `>`, `&`), so their presence only sends the body to the exact check.
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7][0-9a-fA-F]")


def too_deep(body: bytes, doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if `doc` nests more than `limit` arrays/objects.

    Fast path: fewer opening brackets in the raw bytes than the limit (brackets inside
    strings only over-count) means the depth cannot exceed it. Otherwise walk the
    decoded document with an explicit stack.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def first_out_of_range_int(doc: dict[str, Any]) -> str | None:
    """The first top-level field holding an integer outside int64, if any."""
    for key, value in doc.items():
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            return key
    return None


# Objects whose fields Thermostat reads or writes (the effort, `include_usage`, the thinking
# budget): a key repeated inside one is as ambiguous as a repeated top-level field.
WATCHED_OBJECTS: tuple[str, ...] = ("output_config", "reasoning", "stream_options", "thinking")


def duplicate_watched_key(body: bytes, doc: dict[str, Any]) -> str | None:
    """The first watched key that occurs more than once in `body`, if any: a top-level one
    (`"temperature"`), or any key inside a watched object (`"output_config.effort"`).

    Three steps for the top level, each only when the previous one cannot decide:
    1. Compact JSON (what the official SDKs send): if the top-level pairs msgspec kept
       account for every byte of the body, nothing was dropped, so nothing repeated.
    2. Every watched key present appears once as a quoted token in the raw bytes and
       nothing spells a key through escapes: no watched key repeats.
    3. The exact check parses the keys' order with the standard library (the body is
       already known to be valid JSON of bounded depth).
    A watched object present is checked the same way on its own bytes (steps 1 and 3).

    Before all of them (step 0), for a compact body: if re-encoding the decoded document gives
    the body's own bytes, no object in it repeats a key at any depth (an encoded dict names
    each key once), so nothing needs to be decoded a second time. Any other body (other
    spacing, number spelling or escapes) goes on to step 1 as before.
    """
    if body[1:2] == b'"' and _same_encoding(body, doc):
        return None
    pairs = _top_level(body)
    if not _accounts_for_every_byte(body, pairs):
        suspicious = _ASCII_ESCAPE.search(body) is not None
        if not suspicious:
            for key in WATCHED_KEYS:
                if key in doc and body.count(_QUOTED[key]) > 1:
                    suspicious = True
                    break
        if suspicious:
            top = _repeated(body, _QUOTED)
            if top is not None:
                return top
    for name in WATCHED_OBJECTS:
        raw = pairs.get(name)
        if raw is not None and isinstance(doc.get(name), dict):
            inner = bytes(raw)
            if not _accounts_for_every_byte(inner, _top_level(inner)):
                nested = _repeated(inner, None)
                if nested is not None:
                    return f"{name}.{nested}"
    return None


def _repeated(body: bytes, watched: dict[str, bytes] | None) -> str | None:
    """The exact check: the first key of the outermost object seen twice (among `watched`, or any)."""
    # Numbers are irrelevant here; skipping their conversion also avoids int()'s digit limit.
    keys = json.loads(body, object_pairs_hook=_keys_only, parse_int=_zero, parse_float=_zero)
    seen: set[str] = set()
    for key in keys:
        if key in seen and (watched is None or key in watched):
            return str(key)
        seen.add(key)
    return None


_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_encode = msgspec.json.Encoder().encode


def _same_encoding(body: bytes, doc: dict[str, Any]) -> bool:
    """Is `body` byte for byte msgspec's encoding of `doc` (its own decoding)? False if that cannot be encoded."""
    try:
        return _encode(doc) == body
    except (msgspec.EncodeError, OverflowError, TypeError, ValueError):
        return False


def _accounts_for_every_byte(body: bytes, pairs: dict[str, msgspec.Raw]) -> bool:
    """`{` + pairs `"key":value` joined by `,` + `}` with no byte left over.

    A repeated key would leave its dropped pair's bytes unaccounted for; so does
    whitespace or an escaped key, which only sends the body to the next step.
    """
    # `{` and `}`, minus the comma the last pair does not have; per pair its quotes, colon and comma.
    used = 1 + 4 * len(pairs) + sum(map(len, pairs.values()))
    keys = "".join(pairs)  # the keys' UTF-8 bytes in one count (ASCII keys, the usual: one byte a character)
    used += len(keys) if keys.isascii() else len(keys.encode())
    return used == len(body)


def _zero(_: str) -> int:
    return 0


def _keys_only(pairs: list[tuple[str, Any]]) -> list[str]:
    """`object_pairs_hook` for the exact check: the outermost object's keys, in order."""
    return [key for key, _ in pairs]
