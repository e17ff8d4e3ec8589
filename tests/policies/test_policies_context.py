"""Context extraction, fingerprint, feature vector and the arm grid."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from policies.arms import BASELINE_INDEX, candidate_arms
from policies.context import (
    build_context,
    context_bucket,
    context_features,
    context_fingerprint,
    estimate_prompt_tokens,
    numeric_features,
)
from policies.records import Arm
from policies.settings import ArmGridSettings


def test_estimate_prompt_tokens_by_hand() -> None:
    body = {"messages": [{"role": "system", "content": "abcdef"}, {"role": "user", "content": "abcdefg"}]}
    # 3 priming + 2 messages x 4 framing + ceil(6/3)=2 + ceil(7/3)=3
    assert estimate_prompt_tokens(body) == 3 + 8 + 2 + 3


def test_estimate_prompt_tokens_completions_shapes() -> None:
    assert estimate_prompt_tokens({"prompt": "abcdefghi"}) == 3
    assert estimate_prompt_tokens({"prompt": [1, 2, 3, 4]}) == 4
    assert estimate_prompt_tokens({"prompt": [[1, 2], [3]]}) == 3
    assert estimate_prompt_tokens({"prompt": ["abc", "abcd"]}) == 1 + 2


def test_estimate_is_conservative_for_english() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50  # ~ 10 tokens per sentence
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": text}]}) > 500


def test_build_context_reads_fields() -> None:
    body = {
        "model": "gpt-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}],
        "temperature": 0.3,
        "max_tokens": 100,
        "max_completion_tokens": 200,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_object"},
        "stream": True,
    }
    ctx = build_context(body, task_type="Code", endpoint="chat", upstream="u1")
    assert ctx.task_type == "code"
    assert ctx.model == "gpt-x"
    assert ctx.client_max_tokens == 200  # max_completion_tokens wins
    assert ctx.client_temperature == 0.3
    assert ctx.has_tools and ctx.json_mode and ctx.stream
    assert ctx.message_count == 1
    assert ctx.upstream == "u1"
    assert ctx.prompt_tokens_est >= 85  # the image part is charged


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": None},
        {"messages": "not a list"},
        {"messages": [None, 3, {"content": None}, {"content": {"odd": True}}]},
        {"model": 3, "temperature": True, "max_tokens": "12", "stream": "yes"},
        {"temperature": float("nan"), "max_tokens": 1e400},
        {"prompt": None},
        {"response_format": "json"},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
    ],
)
def test_build_context_never_raises(body: dict) -> None:
    ctx = build_context(body, task_type="", endpoint="chat")
    assert ctx.task_type == "default"
    assert ctx.client_temperature is None or isinstance(ctx.client_temperature, float)
    x = numeric_features(ctx)
    assert x.shape == (7,) and np.all((x >= 0) & (x <= 1))


def test_fingerprint_stable_across_processes() -> None:
    ctx = build_context({"model": "m", "messages": [{"role": "user", "content": "x"}]}, task_type="qa", endpoint="chat")
    here = context_fingerprint(ctx)
    assert -(2**63) <= here < 2**63
    code = (
        "from policies.context import build_context, context_fingerprint;"
        "print(context_fingerprint(build_context({'model': 'm', 'messages': [{'role': 'user', 'content': 'x'}]},"
        " task_type='qa', endpoint='chat')))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == here


def test_bucket_and_features() -> None:
    ctx = build_context({"model": "m", "stream": True}, task_type="code", endpoint="chat")
    assert context_bucket(ctx) == "code|m|chat|p0|j0|t0"
    assert context_features(ctx)["bucket"] == "code|m|chat|p0|j0|t0"
    x = numeric_features(ctx)
    assert x.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # bias, empty prompt, stream
    on_upstream = build_context({"model": "m"}, task_type="code", endpoint="chat", upstream="azure|eu")
    assert context_bucket(on_upstream) == "code|m@azure/eu|chat|p0|j0|t0"  # statistics per upstream model


def test_candidate_arms_grid() -> None:
    baseline = Arm(temperature=0.7, max_tokens=512)
    arms = candidate_arms(baseline, max_delta_temperature=0.2, max_delta_max_tokens=500, grid=ArmGridSettings())
    assert arms[BASELINE_INDEX] == baseline
    assert len(arms) == 25
    assert {a.temperature for a in arms} == {0.5, 0.6, 0.7, 0.8, 0.9}
    assert {a.max_tokens for a in arms} == {12, 262, 512, 762, 1012}


def test_candidate_arms_even_steps_and_invalid_values() -> None:
    baseline = Arm(temperature=0.1, max_tokens=100)
    arms = candidate_arms(baseline, max_delta_temperature=0.2, max_delta_max_tokens=200, grid=ArmGridSettings(4, 2))
    assert arms[0] == baseline
    assert all(a.temperature >= 0 and a.max_tokens >= 1 for a in arms)
    assert len({(a.temperature, a.max_tokens) for a in arms}) == len(arms)
    assert all(round(a.temperature, 3) == a.temperature for a in arms)
    assert candidate_arms(baseline, max_delta_temperature=0, max_delta_max_tokens=0, grid=ArmGridSettings()) == [baseline]


def test_context_of_responses_and_anthropic_bodies() -> None:
    """The new wire formats' fields feed the same features (cap, JSON mode, messages, prompt size)."""
    from policies.context import build_context, context_bucket

    responses = {"model": "gpt-r", "input": [{"role": "user", "content": "x" * 400}], "instructions": "y" * 400,
                 "max_output_tokens": 300, "text": {"format": {"type": "json_schema", "name": "n"}}}
    ctx = build_context(responses, task_type="code", endpoint="responses", effort="low")
    assert (ctx.client_max_tokens, ctx.json_mode, ctx.message_count, ctx.client_effort) == (300, True, 1, "low")
    assert ctx.prompt_tokens_est >= 200  # 800 characters of input and instructions
    assert "|responses|" in context_bucket(ctx)
    plain = build_context({"model": "gpt-r", "input": "hello"}, task_type="t", endpoint="responses")
    assert plain.message_count == 1 and plain.prompt_tokens_est >= 2 and plain.client_effort is None
    messages = {"model": "c", "max_tokens": 900, "system": "z" * 400, "messages": [{"role": "user", "content": "hi"}],
                "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": {}}}}
    actx = build_context(messages, task_type="t", endpoint="anthropic", effort="high")
    assert (actx.client_max_tokens, actx.json_mode, actx.message_count) == (900, True, 1)
    assert actx.prompt_tokens_est >= 100
