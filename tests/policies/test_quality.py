"""The automatic quality rules."""

from __future__ import annotations

import pytest

from policies.quality import auto_quality, client_error
from policies.records import Params
from policies.settings import QualitySettings

S = QualitySettings()


def q(**kwargs: object) -> float:
    args = {"status": 200, "content": "A fine answer.", "finish_reason": "stop", "json_mode": False}
    args.update(kwargs)
    return auto_quality(settings=S, **args)  # type: ignore[arg-type]


def test_good_answer_scores_one() -> None:
    assert q() == 1.0


@pytest.mark.parametrize("status", [0, 400, 429, 500, 503])
def test_upstream_error_is_zero(status: int) -> None:
    assert q(status=status) == 0.0


def test_truncation_penalised() -> None:
    assert q(finish_reason="length") == pytest.approx(0.6)


@pytest.mark.parametrize("content", [None, "", "   \n"])
def test_empty_content(content: str | None) -> None:
    assert q(content=content) == 0.0


def test_json_mode() -> None:
    assert q(json_mode=True, content='{"a": 1}') == 1.0
    assert q(json_mode=True, content='{"a": 1') == pytest.approx(0.1)
    assert q(json_mode=True, content='```json\n{"a": 1}\n```') == pytest.approx(0.1)
    # truncated JSON: invalid and cut
    assert q(json_mode=True, content='{"a": ', finish_reason="length") == pytest.approx(0.1 * 0.6)


def test_tool_arguments() -> None:
    assert q(content=None, tool_arguments=['{"city": "Paris"}'], finish_reason="tool_calls") == 1.0
    assert q(content=None, tool_arguments=['{"city": "Par'], finish_reason="tool_calls") == pytest.approx(0.1)
    assert q(content=None, tool_arguments=["[1, 2]"]) == pytest.approx(0.1)  # arguments must be an object


def test_refusals() -> None:
    assert q(content="I\u2019m sorry, but I can\u2019t help with that.") == pytest.approx(0.2)
    assert q(content="As an AI language model, I cannot ...") == pytest.approx(0.2)
    assert q(finish_reason="content_filter") == pytest.approx(0.2)
    long_answer = "Here is the essay. " * 30 + "He said: I cannot help with that."
    assert q(content=long_answer) == 1.0


def test_settings_are_honoured() -> None:
    custom = QualitySettings(truncated_penalty=0.5, refusal_phrases=("nope",))
    assert auto_quality(status=200, content="x", finish_reason="length", json_mode=False, settings=custom) == 0.5
    assert auto_quality(status=200, content="Nope.", finish_reason="stop", json_mode=False, settings=custom) == 0.2


CLIENT = Params(temperature=0.7, max_tokens=100, effort="medium")


@pytest.mark.parametrize(("status", "sent", "expected"), [
    (400, CLIENT, True),                                                   # the client's own values refused
    (404, Params(temperature=0.5, max_tokens=100, effort="medium"), True),  # another temperature cannot earn a 404
    (422, Params(temperature=0.9, max_tokens=60, effort="medium"), True),   # nor a lower cap a 422
    (400, Params(temperature=0.7, max_tokens=150, effort="medium"), False),  # a raised cap may be why (context length)
    (400, Params(temperature=0.7, max_tokens=100, effort="high"), False),   # another effort level may be unsupported
    (408, CLIENT, False), (429, CLIENT, False),                              # time and rate, not the body
    (200, CLIENT, False), (500, CLIENT, False), (0, CLIENT, False),
])
def test_client_error_is_a_4xx_the_clients_own_values_earned(status: int, sent: Params, expected: bool) -> None:
    assert client_error(status, sent, CLIENT) is expected


def test_an_added_temperature_may_be_why() -> None:
    assert client_error(400, Params(temperature=1.0, max_tokens=100), Params(max_tokens=100)) is False
    assert client_error(400, Params(max_tokens=100), Params(max_tokens=100)) is True
