"""Delayed feedback: the control API's door to the one feedback entry point (`proxy.decision.feedback`)."""

from __future__ import annotations

from litestar import Controller, Request, post
from litestar.params import JSONBody

from proxy.control.deps import Deps
from proxy.control.errors import ERR
from proxy.control.schemas import RecordOutcomeIn, RecordOutcomeResult
from proxy.control.views import actor_of, write_audit
from proxy.decision.feedback import DecisionNotFound, FeedbackConflict
from proxy.edge.errors import ProxyError


class FeedbackController(Controller):
    path = "/"

    @post("/record-outcome", status_code=200, summary="Delayed feedback: replace the automatic quality of a request",
          responses={404: ERR, 409: ERR})
    async def record_outcome(self, request: Request, deps: Deps, data: JSONBody[RecordOutcomeIn]) -> RecordOutcomeResult:
        actor = actor_of(request)
        try:
            result = await deps.record_outcome(data, actor)
        except DecisionNotFound:
            raise ProxyError(404, f"no decision is known for request id '{data.request_id}'", "request_not_found", "not_found_error", "request_id") from None
        except FeedbackConflict:
            raise ProxyError(409, f"feedback for '{data.request_id}' was already recorded; send overwrite=true to replace it",
                             "feedback_exists", "conflict_error", "overwrite") from None
        await write_audit(deps, actor, "record_outcome", data.request_id,
                          {"quality": result.previous_quality, "reward": result.previous_reward},
                          {"quality": result.quality, "reward": result.reward, "policy_updated": result.policy_updated})
        return result
