"""Schema validation of a finished answer, kept off the event loop when it can be slow.

`policies.validators.SchemaValidators` costs about 2 µs per small document once the
schema is compiled (bench/results/validator_speed.md), but a first compile (~80 µs for a
small schema, more for a large one) or a large answer can pass a millisecond, so past
`inline_chars` of answer and schema text the check runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from policies.validators import SchemaValidators, Violation, schema_of_response_format, tool_schemas

INLINE_CHARS = 4096


def _check(validators: SchemaValidators, content: str | None, response_format: Any, tool_calls: Sequence[tuple[str, str]], tools: Any) -> Violation | None:
    return validators.check_content(content, response_format) or validators.check_tool_calls(tool_calls, tools)


async def validate_answer(
    validators: SchemaValidators, content: str | None, response_format: Any = None, tool_calls: Sequence[tuple[str, str]] = (),
    tools: Any = None, inline_chars: int = INLINE_CHARS,
) -> Violation | None:
    """The violation (None when the answer conforms or nothing was asked); see the module docstring."""
    schema = schema_of_response_format(response_format)
    declared = tool_schemas(tools) if tool_calls else {}
    if schema is None and not declared:
        return None
    size = len(content or "") + sum(len(args or "") for _, args in tool_calls)
    size += len(json.dumps(schema)) if schema is not None else 0
    size += sum(len(json.dumps(s)) for s in declared.values())
    if size <= inline_chars:
        return _check(validators, content, response_format, tool_calls, tools)
    return await asyncio.to_thread(_check, validators, content, response_format, tool_calls, tools)
