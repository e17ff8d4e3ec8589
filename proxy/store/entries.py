"""What the recorder carries from the request path to storage."""

from __future__ import annotations

import msgspec

from policies.records import Decision, Outcome


class LogEntry(msgspec.Struct, tag="decision"):
    """One request: the decision registered before forwarding and its outcome."""

    decision: Decision
    outcome: Outcome
    context_features: dict[str, object] = {}
    prompt: str | None = None  # only when `server.store_prompts = true`


class FeedbackEntry(msgspec.Struct, tag="feedback"):
    """Delayed feedback for a request id; replaces the automatic quality score."""

    request_id: str
    quality: float
    reward: float | None
    payload: dict[str, object]
    received_at: float
    source: str = "explicit"  # explicit | judge | implicit (policies.signals); stored in decision_feedback.source


Entry = LogEntry | FeedbackEntry
