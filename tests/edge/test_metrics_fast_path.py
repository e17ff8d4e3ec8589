"""The metrics' fast handles (`Metrics.counter`, `Metrics.histogram`) count exactly what prometheus_client's public API counts.

They add to the children's value holders directly (proxy/observability/metrics.py); if a
prometheus_client release changes that layout, this test says so before the numbers drift.
"""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from proxy.observability.metrics import LATENCY_BUCKETS, Metrics, _FastHistogram

AMOUNTS = (0.0, -0.0, 0.004, 0.005, 0.0051, 0.01, 1.0, 2.5, 119.9, 120.0, 121.0, math.inf, math.nan, -3.0, 7)


def _exposition(m: Metrics) -> list[str]:
    """The exposition without the `_created` timestamps (which differ between two registries)."""
    return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]


def test_fast_handles_expose_what_the_public_api_does() -> None:
    fast, public = Metrics(), Metrics()
    assert isinstance(fast.histogram(fast.request_duration, "chat", "optimized"), _FastHistogram)
    for amount in AMOUNTS:
        fast.histogram(fast.request_duration, "chat", "optimized").observe(amount)
        public.request_duration.labels("chat", "optimized").observe(amount)
        fast.overhead_handle.observe(amount)
        public.overhead.observe(amount)
        if amount >= 0 or math.isnan(amount):
            fast.counter(fast.tokens, "chat", "prompt").inc(amount)
            public.tokens.labels("chat", "prompt").inc(amount)
    fast.counter(fast.decisions, "chat", "optimized", "client").inc(1)
    public.decisions.labels("chat", "optimized", "client").inc(1)
    assert _exposition(fast) == _exposition(public)
    assert LATENCY_BUCKETS[-1] == 120.0  # the boundaries above sit on these buckets
