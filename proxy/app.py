"""App factory: the `/v1/*` edge in front of a Litestar app for everything else."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, MediaType, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.config import Config
from proxy.edge import ProxyEdge
from proxy.runtime import Runtime


def build_litestar(rt: Runtime) -> Litestar:
    @get("/health", media_type=MediaType.JSON, include_in_schema=True, sync_to_thread=False)
    def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(__import__("time").time() - rt.started_at, 3)}

    @get("/health/liveness", media_type=MediaType.JSON, sync_to_thread=False)
    def liveness() -> dict[str, Any]:
        return {"status": "ok"}

    @get("/health/readiness", media_type=MediaType.JSON, sync_to_thread=False)
    def readiness() -> Response[dict[str, Any]]:
        checks = {
            "upstreams": bool(rt.pool.upstreams),
            "writer": rt.recorder.ready,
        }
        ok = all(checks.values())
        return Response({"status": "ok" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)

    @get("/metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Litestar(
        route_handlers=[health, liveness, readiness, metrics],
        on_startup=[rt.start],
        on_shutdown=[rt.stop],
    )


def create_app(config: Config, runtime: Runtime | None = None) -> ProxyEdge:
    rt = runtime or Runtime(config)
    app = ProxyEdge(rt, build_litestar(rt))
    return app
