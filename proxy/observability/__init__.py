"""Metrics (Prometheus), in-process alert webhooks and the dashboard page."""

from __future__ import annotations

from proxy.observability.alerts import Alert, AlertManager
from proxy.observability.metrics import (
    NEGATIVE_INC,
    BoundedLabel,
    FoldedBuckets,
    LiveSources,
    Metrics,
    RolloutSource,
    decision_series,
    exposition,
    install_live_metrics,
    observe_decision,
    refresh_live,
    watch_loop_lag,
)
from proxy.observability.tracing import NullTracer, Timings, Tracer, make_tracer

__all__ = [
    "NEGATIVE_INC",
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
    "decision_series",
    "exposition",
    "install_live_metrics",
    "make_tracer",
    "observe_decision",
    "refresh_live",
    "watch_loop_lag",
]
