"""Structured-output validators: does the answer satisfy the schema the client asked for?

`response_format: {"type": "json_schema", "json_schema": {"schema": ...}}` and the
`parameters` of each tool the client declared are JSON Schemas. Parsing as JSON (the
rules in `policies.quality`) is not enough: an answer missing a required field is as
useless to the client as one that does not parse. A violation caps the automatic
quality at `[policy.quality] schema_invalid_score` and its reason is recorded.

Library: `jsonschema_rs`, chosen by bench/validator_speed.py (results in
bench/results/validator_speed.md): about 2 µs per validation and 80 µs per compile,
against 350 µs per validation for `jsonschema`, and it does not exec() generated
Python source built from a client-controlled schema as `fastjsonschema` does (6 ms per
compile). Its regexes are linear-time (no ReDoS from a client's `pattern`), and remote
`$ref`s are refused (no outbound fetch chosen by a client).

Compiled validators are cached by the hash of the canonical schema text (bounded LRU).
No I/O and no clock: callers that validate large answers may run `check_*` in a thread.

A violation has two texts. `detail` quotes the validator's messages, which repeat values
from the answer (and an answer may repeat the prompt): for a debugger's eyes only. `reason`
is what is logged and stored in the decision log (`logged_decisions.validator_reason`):
schema paths and error kinds only, words taken from the client's schema and never from the
answer (an undeclared tool's name is the model's text, so it is left out), at most
`MAX_REASON_CHARS` characters.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jsonschema_rs

from policies.settings import QualitySettings

# Validation of a compile failure: a schema we cannot compile says nothing about the answer.
_UNUSABLE = object()

MAX_REASON_CHARS = 200  # the stored reason's bound (sql/0005_validator_reason.sql)
_PART_CHARS = 64  # one schema path or tool name inside it


class Violation(NamedTuple):
    """Why an answer breaks its schema: `reason` to log and store, `detail` with the answer's values (module docstring)."""

    reason: str
    detail: str


def _part(text: str) -> str:
    """A schema word fit for the stored reason: printable, one line, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text)[:_PART_CHARS]


def _no_remote(uri: str) -> Any:
    raise ValueError(f"remote $ref not allowed: {uri}")


def schema_of_response_format(response_format: Any) -> dict[str, Any] | None:
    """The JSON Schema inside a `json_schema` response_format, else None."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    return dict(schema) if isinstance(schema, Mapping) else None


def tool_schemas(tools: Any) -> dict[str, dict[str, Any]]:
    """Function name -> `parameters` schema for the tools a chat request declared."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        return out
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and isinstance(fn.get("parameters"), Mapping):
            out[fn["name"]] = dict(fn["parameters"])
    return out


class SchemaValidators:
    """Compiled validators keyed by schema hash, at most `max_entries` of them (LRU)."""

    def __init__(self, max_entries: int = 512, max_errors: int = 3) -> None:
        self.max_entries = max_entries
        self.max_errors = max_errors
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # callers may validate from worker threads
        self.compiles = 0
        self.unusable = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _validator(self, schema: Mapping[str, Any]) -> Any:
        key = hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        try:
            compiled: Any = jsonschema_rs.validator_for(dict(schema), retriever=_no_remote)
        except (ValueError, TypeError):
            compiled = _UNUSABLE
        with self._lock:
            self.compiles += 1
            self.unusable += compiled is _UNUSABLE
            self._cache[key] = compiled
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return compiled

    def violation(self, instance: Any, schema: Mapping[str, Any]) -> Violation | None:
        """Why `instance` breaks `schema` (first few errors, one line each text), or None when it conforms."""
        validator = self._validator(schema)
        if validator is _UNUSABLE or validator.is_valid(instance):
            return None
        details, reasons = [], []
        for err in validator.iter_errors(instance):
            path = "/".join(str(p) for p in err.instance_path) or "(root)"
            details.append(f"{path}: {err.message}")
            where = "/".join(str(p) for p in err.schema_path) or "(root)"
            reasons.append(f"{_part(where)} ({type(err.kind).__name__})")
            if len(details) >= self.max_errors:
                break
        return Violation(reason="; ".join(reasons), detail="; ".join(details)[:500])

    def check_content(self, content: str | None, response_format: Any) -> Violation | None:
        """Why the answer text breaks the requested `json_schema`, or None (also when there is none)."""
        schema = schema_of_response_format(response_format)
        if schema is None or not content or not content.strip():
            return None
        try:
            instance = json.loads(content)
        except ValueError:
            return _prefixed("response_format", Violation("answer is not JSON", "answer is not JSON"))
        found = self.violation(instance, schema)
        return None if found is None else _prefixed("response_format", found)

    def check_tool_calls(self, tool_calls: Sequence[tuple[str, str]], tools: Any) -> Violation | None:
        """Why a tool call's `arguments` break its tool's `parameters`, or None.

        `tool_calls` holds (function name, arguments text). A call to an undeclared tool is a
        violation; arguments that do not parse are already scored by `policies.quality`.
        """
        schemas = tool_schemas(tools)
        if not schemas:
            return None
        for name, arguments in tool_calls:
            if name not in schemas:
                return Violation(reason="tool: not among the declared tools", detail=f"tool {name!r}: not among the declared tools")
            try:
                instance = json.loads(arguments or "{}")
            except ValueError:
                return _prefixed(f"tool {_part(name)}", Violation("arguments are not JSON", "arguments are not JSON"), f"tool {name!r}")
            found = self.violation(instance, schemas[name])
            if found is not None:
                return _prefixed(f"tool {_part(name)}", found, f"tool {name!r}")
        return None


def _prefixed(prefix: str, found: Violation, detail_prefix: str | None = None) -> Violation:
    return Violation(reason=f"{prefix}: {found.reason}"[:MAX_REASON_CHARS], detail=f"{detail_prefix or prefix}: {found.detail}")


def validated_quality(score: float, violation: Violation | str | None, settings: QualitySettings) -> float:
    """The automatic score once validation is known: capped at `schema_invalid_score` on a violation."""
    return score if violation is None else min(score, settings.schema_invalid_score)
