"""Delayed feedback: the control API's door to the one feedback entry point (`proxy.decision.feedback`)."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from proxy.common import ProxyError
from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import RecordOutcomeIn, RecordOutcomeResult
from proxy.control.views import actor_of, write_audit
from proxy.decision import DecisionNotFound, ExplicitFeedback, FeedbackConflict, record_outcome

SIGNAL_NAMES = {"explicit": "earlier explicit feedback", "judge": "the judge's score", "implicit": "a regeneration mark"}
"""The log's `decision_feedback.source`, named for a person."""


def replaced_text(result: RecordOutcomeResult, earlier: str) -> str:
    """What the new quality took the place of, with its value."""
    if result.overwritten:
        was = f" (quality {result.previous_quality:g})" if result.previous_quality is not None else ""
        return f"replaced {earlier}{was}"
    if result.automatic_quality is not None:
        return f"replaced the automatic score (quality {result.automatic_quality:g})"
    if result.reward is None:
        return "nothing yet: the request is still in flight, and this quality will replace its automatic score when it completes"
    return "nothing: the request had no automatic score"


class FeedbackController(Controller):
    path = "/"

    @post("/record-outcome", status_code=200, summary="Delayed feedback: replace the automatic quality of a request",
          responses={404: ERR, 409: ERR})
    async def record_outcome(self, request: Request, deps: Deps, data: JSONBody[RecordOutcomeIn]) -> RecordOutcomeResult:
        actor = actor_of(request)
        try:
            row = await deps.log_store.get_decision(data.request_id)
        except Exception:  # the name of the earlier signal is a nicety: a store hiccup must not refuse the feedback
            row = None
        earlier = SIGNAL_NAMES.get(row.feedback_source or "explicit", "earlier feedback") if row is not None and row.feedback_quality is not None else "earlier feedback"
        try:
            explicit = ExplicitFeedback(request_id=data.request_id, quality=data.outcome.quality, overwrite=data.overwrite,
                                        payload=msgspec.to_builtins(data.outcome))
            result = RecordOutcomeResult(**msgspec.structs.asdict(await record_outcome(deps.learning, explicit, actor)))
        except DecisionNotFound:
            raise ProxyError(404, f"no decision is known for request id '{data.request_id}'", "request_not_found", "not_found_error", "request_id") from None
        except FeedbackConflict:
            raise ProxyError(409, f"{earlier} was already recorded for '{data.request_id}'; send overwrite=true to replace it",
                             "feedback_exists", "conflict_error", "overwrite") from None
        result = msgspec.structs.replace(result, replaced=replaced_text(result, earlier))
        await write_audit(deps, actor, "record_outcome", data.request_id,
                          {"quality": result.previous_quality, "reward": result.previous_reward},
                          {"quality": result.quality, "reward": result.reward, "policy_updated": result.policy_updated})
        return result
