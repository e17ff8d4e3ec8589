"""The control API: `/api/optimization/*`, one Litestar controller per resource behind one admin guard.

`build_control(deps)` returns the router that `proxy.app` mounts. Handlers receive the
typed `ControlDeps` by dependency injection; every response body is a msgspec struct from
`proxy.control.schemas`, every error `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, Router
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler

from proxy.common import ProxyError
from proxy.control.budget import BudgetController
from proxy.control.compliance import ComplianceController
from proxy.control.decisions import DecisionsController
from proxy.control.deps import ControlDeps
from proxy.control.errors import UNKNOWN_FIELD, document_errors, integral_floats_as_ints
from proxy.control.feedback import FeedbackController
from proxy.control.performance import PerformanceController
from proxy.control.quality import QualityController
from proxy.control.recommend import RecommendController
from proxy.control.rollout import RolloutApiController
from proxy.control.status import StatusController
from proxy.control.views import PREFIX

CONTROLLERS: tuple[type[Controller], ...] = (
    StatusController, PerformanceController, RolloutApiController, BudgetController, DecisionsController,
    ComplianceController, RecommendController, FeedbackController,
    QualityController,
)

for _controller in CONTROLLERS:  # once: the handlers live on the classes, shared by every app built here
    for _handler in vars(_controller).values():
        if isinstance(_handler, HTTPRouteHandler):
            document_errors(_handler)


async def strict_body(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Litestar converts bodies leniently (0 or "true" for a boolean, "5" for a number);
    the OpenAPI document promises JSON types, so the body is first decoded strictly."""
    data = getattr(handler, "parsed_fn_signature", None)
    field = data.parameters.get("data") if data is not None else None
    if field is None or not isinstance(connection, Request):
        return
    raw = await connection.body()
    if not raw.strip():
        if field.has_default:
            return  # absent body: Litestar applies the default
        raise ProxyError(400, f"{connection.method} {connection.url.path} needs a JSON object as its body; send {{}} to use every default",
                         "missing_body")
    try:
        msgspec.convert(integral_floats_as_ints(msgspec.json.decode(raw)), type=field.annotation, strict=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        param = where.rstrip("`").removeprefix("$").lstrip(".") or None
        unknown = UNKNOWN_FIELD.search(message)
        if unknown:
            name = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
            raise ProxyError(400, f"unknown field '{name}' in the request body (remove it, or check its spelling)", "unknown_field",
                             param=name) from None
        raise ProxyError(400, f"invalid request body: {message}", "invalid_body", param=param) from None
    except msgspec.DecodeError as exc:
        raise ProxyError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None


def build_control(deps: ControlDeps) -> Router:
    auth = deps.auth

    def admin_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        # Guards run before Litestar reads the body, so a forged request never reaches a handler.
        if handler.opt.get("public"):
            return
        headers = connection.headers
        auth.check_origin(headers)
        client = connection.scope.get("client")
        actor = auth.check(headers, client[0] if client else None)
        auth.check_content_type(str(connection.scope.get("method", "GET")), headers)
        connection.scope.setdefault("state", {})["thermostat_actor"] = actor

    def provide() -> ControlDeps:
        return deps

    return Router(
        path=PREFIX,
        route_handlers=list(CONTROLLERS),
        dependencies={"deps": Provide(provide, use_cache=True, sync_to_thread=False)},
        guards=[admin_guard, strict_body],
        tags=["optimization"],
    )
