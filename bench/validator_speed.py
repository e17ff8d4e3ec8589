"""Which JSON Schema library validates answers: compile and validate cost, measured.

Candidates: `jsonschema` (pure Python, the reference implementation), `fastjsonschema`
(generates and exec()s Python source from the schema), `jsonschema_rs` (Rust). The
schema comes from the client (`response_format.json_schema`, tool `parameters`), so
compile cost matters as much as validate cost; compiled validators are cached by hash.

Run: .venv/bin/python bench/validator_speed.py  -> bench/results/validator_speed.md
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
GOOD = {"name": "Ada", "age": 36, "tags": ["x"] * 10, "address": {"city": "London", "zip": "12345"}, "kind": "a"}
BAD = {"name": "", "age": -1, "tags": [1], "address": {"zip": "x"}, "kind": "z", "extra": 1}


def _time(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def bench() -> list[tuple[str, float, float, float]]:
    rows: list[tuple[str, float, float, float]] = []

    import jsonschema

    def js_compile() -> Any:
        cls = jsonschema.validators.validator_for(SCHEMA)
        return cls(SCHEMA)

    v = js_compile()
    rows.append((f"jsonschema {version('jsonschema')}",
                 _time(js_compile, 200), _time(lambda: v.is_valid(GOOD), 2000), _time(lambda: list(v.iter_errors(BAD)), 500)))

    import fastjsonschema

    def fj_compile() -> Any:
        return fastjsonschema.compile(SCHEMA)

    f = fj_compile()

    def fj_bad() -> None:
        try:
            f(BAD)
        except fastjsonschema.JsonSchemaException:
            pass

    rows.append((f"fastjsonschema {fastjsonschema.VERSION}", _time(fj_compile, 50), _time(lambda: f(GOOD), 2000), _time(fj_bad, 2000)))

    try:
        import jsonschema_rs
    except ImportError:
        return rows

    def rs_compile() -> Any:
        return jsonschema_rs.validator_for(SCHEMA)

    r = rs_compile()
    rows.append((f"jsonschema_rs {version('jsonschema_rs')}", _time(rs_compile, 500), _time(lambda: r.is_valid(GOOD), 5000), _time(lambda: list(r.iter_errors(BAD)), 2000)))
    return rows


def main() -> None:
    rows = bench()
    lines = [
        "# JSON Schema validator cost (µs per call, one process, warm)",
        "",
        f"Python {platform.python_version()} on {platform.machine()}; schema: 5 properties, nested object, pattern, enum "
        f"({len(json.dumps(SCHEMA))} bytes). Command: `.venv/bin/python bench/validator_speed.py`.",
        "",
        "| library | compile | validate (valid) | validate (invalid, all errors) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {c:.1f} | {ok:.2f} | {bad:.2f} |" for name, c, ok, bad in rows]
    out = Path(__file__).parent / "results" / "validator_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
