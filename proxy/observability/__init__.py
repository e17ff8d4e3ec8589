"""Metrics (Prometheus), in-process alert webhooks and the dashboard page."""

from __future__ import annotations

from proxy.observability.alerts import AlertManager
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
)

__all__ = [
    "AlertManager",
    "BoundedLabel",
    "FoldedBuckets",
    "LiveSources",
    "Metrics",
    "RolloutSource",
    "exposition",
    "install_live_metrics",
    "observe_decision",
    "refresh_live",
]
