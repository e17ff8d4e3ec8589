"""Metrics (Prometheus), in-process alert webhooks and the dashboard page."""

from __future__ import annotations

from proxy.observability.alerts import Alert, AlertManager
from proxy.observability.metrics import (
    BoundedLabel,
    FoldedBuckets,
    LiveSources,
    Metrics,
    RolloutSource,
    exposition,
    install_live_metrics,
    observe_decision,
    refresh_live,
    watch_loop_lag,
)
from proxy.observability.tracing import NullTracer, Timings, Tracer, make_tracer

__all__ = [
    "Alert",
    "AlertManager",
    "BoundedLabel",
    "FoldedBuckets",
    "LiveSources",
    "Metrics",
    "NullTracer",
    "RolloutSource",
    "Timings",
    "Tracer",
    "exposition",
    "install_live_metrics",
    "make_tracer",
    "observe_decision",
    "refresh_live",
    "watch_loop_lag",
]
