"""App factory: the `/v1/*` edge in front of a Litestar app for everything else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, MediaType, Response, get
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.config import Config
from proxy.control import EXCEPTION_HANDLERS, AdminAuth, ControlDeps, StrictStructSchemaPlugin, build_control, document_errors, require_token_or_opt_in
from proxy.edge import CHAT, Message, ProxyEdge, Receive, Scope, Send
from proxy.observability import exposition, install_live_metrics, refresh_live
from proxy.runtime import Runtime

DASHBOARD_HTML = Path(__file__).parent / "observability" / "dashboard.html"
PUBLIC = {"public": True}


def control_deps(rt: Runtime) -> ControlDeps:
    """The control API's typed services, taken from the composition root's parts (nothing else reaches a handler)."""
    return ControlDeps(
        config=rt.config, auth=AdminAuth.from_settings(rt.config.admin, rt.config.server.allowed_hosts), decider=rt.bandit,
        budget=rt.budget, slo=rt.slo, log_store=rt.sink, recorder=rt.recorder, registry=rt.registry, state_store=rt.state_store,
        pool=rt.pool, build_context=rt.build_context, learning=rt.feedback_services, on_rollout_events=rt.on_rollout_events,
        patch_chat=CHAT.patch,
        started_at=rt.started_at, feedback=rt.feedback, signals=rt.signal_book, judge_spend=rt.judge_charge if rt.judge is not None else None,
    )


def build_litestar(rt: Runtime) -> Litestar:
    control_state = control_deps(rt)
    control = build_control(control_state)
    live = install_live_metrics(rt.metrics, rt.live)
    dashboard_page = DASHBOARD_HTML.read_bytes()

    @get("/health", media_type=MediaType.JSON, include_in_schema=True, sync_to_thread=False, opt=PUBLIC, summary="Liveness (no auth)")
    def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - rt.started_at, 3)}

    @get("/health/liveness", media_type=MediaType.JSON, sync_to_thread=False, opt=PUBLIC, summary="Liveness (no auth)")
    def liveness() -> dict[str, Any]:
        return {"status": "ok"}

    @get("/health/readiness", media_type=MediaType.JSON, sync_to_thread=False, opt=PUBLIC,
         summary="Readiness (no auth): upstreams and the decision-log writer",
         responses={503: ResponseSpec(data_container=dict[str, Any], description="Not ready: status 'not_ready' and the checks")})
    def readiness() -> Response[dict[str, Any]]:
        failing = rt.recorder.last_error
        checks = {
            "upstreams": bool(rt.pool.upstreams),
            "writer": rt.recorder.ready,
            "log_writes": failing is None,  # answers would wait unlogged (e.g. a full disk)
        }
        ok = all(checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "not_ready", "checks": checks}
        if failing is not None:
            body["last_error"] = failing
        return Response(body, status_code=200 if ok else 503)

    @get("/metrics", media_type=CONTENT_TYPE_LATEST, opt=PUBLIC, summary="Prometheus metrics (no auth)")
    async def metrics() -> Response[bytes]:
        await refresh_live(live)
        return Response(exposition(rt.metrics), media_type=CONTENT_TYPE_LATEST)

    @get("/dashboard", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=False)
    def dashboard() -> Response[bytes]:
        # The page itself holds no data; it reads /api/optimization/dashboard with the token
        # from its URL fragment (`thermostat demo` prints it) or typed in, kept in sessionStorage.
        return Response(dashboard_page, media_type=MediaType.HTML, headers={"cache-control": "no-store"})

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        """Every background loop starts with its owner in `rt.start()` and stops in `rt.stop()`."""
        await rt.start()
        try:
            control_state.auth.warn_if_open()
            yield
        finally:
            await rt.stop()

    for handler in (health, liveness, readiness, metrics):
        document_errors(handler)

    return Litestar(
        route_handlers=[health, liveness, readiness, metrics, dashboard, control],
        exception_handlers=EXCEPTION_HANDLERS,
        plugins=[StrictStructSchemaPlugin()],
        openapi_config=OpenAPIConfig(
            title="Thermostat control API",
            version="0.1.0",
            path="/schema",
            # No document-wide requirement: each control operation names "bearer", the public ones nothing.
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
        ),
        lifespan=[lifespan],
    )


# On everything Litestar serves (the dashboard, the control API, its schema), errors included:
# no page may frame them, where a click on the dashboard's buttons (rollback, promote, waivers)
# could be hijacked, and no answer is sniffed into another content type.
PAGE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
)


def with_page_headers(app: Callable[..., Awaitable[None]]) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """`app` with `PAGE_HEADERS` on every HTTP response (at the ASGI level: Litestar's own
    `response_headers` skip the answers of its exception handlers, such as a 401)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *PAGE_HEADERS]
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def create_app(config: Config, runtime: Runtime | None = None) -> ProxyEdge:
    # Here, not in the CLI, so every way of building the server (serve, workers, tests) obeys it.
    require_token_or_opt_in(config.admin)
    rt = runtime or Runtime(config)
    app = ProxyEdge(rt.edge, with_page_headers(build_litestar(rt)))
    return app
