"""Schema validators on known schemas, tool calls, the cache, and the quality cap."""

from __future__ import annotations

import json

from policies.settings import QualitySettings
from policies.validators import MAX_REASON_CHARS, SchemaValidators, schema_of_response_format, validated_quality

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
RF = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
]


def test_response_format_schema_conforming_and_not() -> None:
    v = SchemaValidators()
    assert v.check_content(json.dumps({"name": "Ada", "age": 36}), RF) is None
    missing = v.check_content(json.dumps({"name": "Ada"}), RF)
    assert missing is not None and "age" in missing.detail and missing.detail.startswith("response_format:")
    assert missing.reason == "response_format: required (Required)"
    extra = v.check_content(json.dumps({"name": "Ada", "age": 1, "x": 1}), RF)
    assert extra is not None and "additional" in extra.detail.lower()
    negative = v.check_content(json.dumps({"name": "Ada", "age": -1}), RF)
    assert negative is not None and "-1" in negative.detail
    assert negative.reason == "response_format: properties/age/minimum (Minimum)"
    assert v.check_content("not json", RF) == ("response_format: answer is not JSON", "response_format: answer is not JSON")


def test_stored_reason_never_quotes_the_answer_and_is_bounded() -> None:
    v = SchemaValidators()
    secret = "my card is 4111 1111 1111 1111; ignore the schema"
    for answer in ({"name": secret, "age": secret}, {"name": 1, "age": 1, secret: 1}, {secret: {"age": secret}}):
        found = v.check_content(json.dumps(answer), RF)
        assert found is not None and "4111" not in found.reason and "card" not in found.reason
    undeclared = v.check_tool_calls([(secret, "{}")], TOOLS)
    assert undeclared is not None and undeclared.reason == "tool: not among the declared tools"
    long_names = {"type": "object", "properties": {f"p{i}{'x' * 90}": {"type": "integer"} for i in range(5)}}
    rf = {"type": "json_schema", "json_schema": {"schema": long_names}}
    many = v.check_content(json.dumps({k: "s" for k in long_names["properties"]}), rf)
    assert many is not None and len(many.reason) <= MAX_REASON_CHARS and many.reason.startswith("response_format: properties/p")


def test_no_schema_means_nothing_to_check() -> None:
    v = SchemaValidators()
    assert schema_of_response_format({"type": "json_object"}) is None
    assert v.check_content('{"a": 1}', {"type": "json_object"}) is None
    assert v.check_content("text", None) is None
    assert v.check_tool_calls([("anything", "{}")], None) is None


def test_tool_arguments_against_parameters() -> None:
    v = SchemaValidators()
    assert v.check_tool_calls([("get_weather", '{"city": "Paris", "unit": "c"}')], TOOLS) is None
    bad = v.check_tool_calls([("get_weather", '{"unit": "k"}')], TOOLS)
    assert bad is not None and bad.detail.startswith("tool 'get_weather'") and "city" in bad.detail
    assert bad.reason == "tool get_weather: required (Required); properties/unit/enum (Enum)"
    launch = v.check_tool_calls([("launch", "{}")], TOOLS)
    assert launch is not None and launch.detail == "tool 'launch': not among the declared tools"


def test_compiled_schemas_cached_by_hash_and_bounded() -> None:
    v = SchemaValidators(max_entries=2)
    for _ in range(3):
        v.check_content('{"name": "a", "age": 1}', RF)
    same_but_reordered = {"type": "json_schema", "json_schema": {"schema": dict(reversed(list(PERSON.items())))}}
    v.check_content('{"name": "a", "age": 1}', same_but_reordered)
    assert v.compiles == 1
    for i in range(5):
        v.violation(i, {"type": "integer", "maximum": i})
    assert len(v) == 2 and v.compiles == 6


def test_remote_ref_is_not_fetched_and_bad_schema_says_nothing() -> None:
    v = SchemaValidators()
    assert v.violation({"a": 1}, {"$ref": "http://127.0.0.1:9/schema.json"}) is None
    assert v.violation({"a": 1}, {"type": "no-such-type"}) is None
    assert v.unusable == 2


def test_violation_caps_quality() -> None:
    s = QualitySettings()
    assert validated_quality(1.0, None, s) == 1.0
    assert validated_quality(1.0, "tool 'x': bad", s) == s.schema_invalid_score == 0.3
    assert validated_quality(0.1, "bad", s) == 0.1  # never raises a lower score


async def test_validate_answer_inline_and_in_a_thread() -> None:
    from proxy.learning.validation import validate_answer

    v = SchemaValidators()
    assert await validate_answer(v, '{"name": "a", "age": 1}', RF) is None
    assert await validate_answer(v, "plain text") is None  # nothing asked
    big = json.dumps({"name": "a" * 10_000})  # past the inline limit: checked in a worker thread
    reason = await validate_answer(v, big, RF)
    assert reason is not None and "age" in reason.detail
    found = await validate_answer(v, None, None, [("get_weather", '{"unit": "c"}')], TOOLS)
    assert found is not None and found.detail == 'tool \'get_weather\': (root): "city" is a required property'
    assert found.reason == "tool get_weather: required (Required)"
