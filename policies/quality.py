"""Automatic quality signal: a score in [0, 1] for every response, no human in the loop.

Rules, first match wins for the base score:

1. Upstream error (status outside 200–299, including 0 for a transport failure) -> 0.0.
2. Tool-call arguments were returned and at least one does not parse as a JSON
   object -> `invalid_json_score` (0.1).
3. No content and no tool call (None, empty or whitespace) -> `empty_score` (0.0).
4. `response_format` asked for JSON (json_mode) and the content does not parse as
   JSON -> `invalid_json_score` (0.1).  Strict: a ```json fence is invalid, because a
   client that asked for JSON will feed the content straight to a parser.
5. `finish_reason == "content_filter"`, or the first `refusal_window_chars` (200)
   characters contain a refusal phrase (`refusal_phrases`, case-insensitive, curly
   apostrophes normalised) -> `refusal_score` (0.2).  Only the opening is checked,
   so a long answer that quotes a refusal is not punished.
6. Otherwise 1.0.

Then, if `finish_reason == "length"` (the answer was cut by max_tokens) the base score
is multiplied by (1 − `truncated_penalty`): `truncated_penalty` is 0.4 by default, so a
cut answer keeps 0.6 of its base score.  This is the main signal
that a max_tokens arm is too small.

Explicit feedback posted later (`record-outcome`) replaces this score; it is only the
default so that every request still teaches the policy something.

A request the upstream refused because of the client's own body (`client_error`) gets no
score at all: it is kept in the log and the error metrics, but is no verdict on the
parameters Thermostat chose.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from policies.records import Params
from policies.settings import QualitySettings

NOT_THE_BODY = frozenset({408, 429})
"""4xx statuses that are about time or rate, not about what the request asked for."""


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, TypeError):
        return False
    return True


def _parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, TypeError):
        return False


def is_refusal(content: str, settings: QualitySettings) -> bool:
    """Whether the opening of `content` contains one of the configured refusal phrases."""
    opening = content[: settings.refusal_window_chars].lower().replace("\u2019", "'")
    # A plain loop, not `any()` over a generator: this runs on every answer, and the generator's
    # set-up and one resume per phrase cost more than the substring tests themselves.
    for phrase in settings.refusal_phrases:
        if phrase in opening:
            return True
    return False


def auto_quality(
    *,
    status: int,
    content: str | None,
    finish_reason: str | None,
    json_mode: bool,
    tool_arguments: Sequence[str] = (),
    settings: QualitySettings,
) -> float:
    """Quality score in [0, 1] by the rules in the module docstring."""
    if not 200 <= status < 300:
        return 0.0
    text = content or ""
    if tool_arguments and not all(_parses_as_object(args) for args in tool_arguments):
        score = settings.invalid_json_score
    elif not text.strip() and not tool_arguments:
        score = settings.empty_score
    elif json_mode and text.strip() and not _parses(text):
        score = settings.invalid_json_score
    elif finish_reason == "content_filter" or is_refusal(text, settings):
        score = settings.refusal_score
    else:
        score = 1.0
    if finish_reason == "length":
        score *= 1.0 - settings.truncated_penalty
    return min(1.0, max(0.0, score))


def learns(status: int, error_class: str | None) -> bool:
    """Does this request teach the policy? A 2xx that was not cut off or broken.

    The one copy of the rule: every other outcome is kept out of the policy's statistics
    (`BanditDecider.observe`, every later signal in `proxy.decision.feedback`, the offline
    replay), out of the conservative monitor's latency and cost streams, and away from the
    judge and the regeneration check. A client's own 4xx is also kept out of quality
    comparisons: it gets no quality at all (`client_error`).
    """
    return 200 <= status < 300 and error_class is None


def client_error(status: int, sent: Params, baseline: Params) -> bool:
    """A 4xx the client's own request earned, which says nothing about the parameters sent.

    An over-long prompt, an unknown model, a malformed field: the upstream would have refused
    the client's own values the same way, so scoring the request 0 would count the client's
    mistake against whatever arm happened to be drawn (and against the task's quality). Not
    the client's: 408 and 429 (time and rate), and a 4xx after Thermostat sent a knob beyond
    the client's own (a raised cap, an added temperature, another effort level), which the
    upstream may have refused because of that value.
    """
    if not 400 <= status < 500 or status in NOT_THE_BODY:
        return False
    raised_cap = sent.max_tokens is not None and (baseline.max_tokens is None or sent.max_tokens > baseline.max_tokens)
    added_temperature = sent.temperature is not None and baseline.temperature is None
    return not (raised_cap or added_temperature or sent.effort != baseline.effort)
