"""SLO monitor: quantiles equal numpy's, windows slide with the injected clock, breaches need min_samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guards.settings import SloSettings
from guards.slo import SloMonitor, quantile_sorted

S = SloSettings(window_s=300.0, min_samples=50, latency_p99_ms=500.0, quality_min=0.7, error_rate_max=0.01)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=1, max_size=400),
    q=st.sampled_from([0.5, 0.95, 0.99]) | st.floats(min_value=0.0, max_value=1.0),
)
def test_quantile_equals_numpy_linear(values: list[float], q: float) -> None:
    assert quantile_sorted(sorted(values), q) == float(np.quantile(values, q))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), min_size=1, max_size=300))
def test_report_percentiles_equal_numpy_percentile(latencies_s: list[float]) -> None:
    mon = SloMonitor(S)
    for i, lat in enumerate(latencies_s):
        mon.observe(1000.0 + i * 0.1, optimized=True, latency_s=lat, error=False, quality=lat / 30.0)
    rep = mon.report(1000.0 + len(latencies_s) * 0.1).optimized
    ms = [x * 1000.0 for x in latencies_s]
    assert rep.p50_ms == float(np.percentile(ms, 50))
    assert rep.p95_ms == float(np.percentile(ms, 95))
    assert rep.p99_ms == float(np.percentile(ms, 99))
    assert rep.mean_quality == pytest.approx(float(np.mean([x / 30.0 for x in latencies_s])), rel=1e-12, abs=1e-15)


def test_window_slides_and_matches_numpy_on_the_surviving_samples() -> None:
    rng = np.random.default_rng(3)
    mon = SloMonitor(S)
    times = np.sort(rng.uniform(0, 900, 3000))
    lats = rng.lognormal(-1.5, 0.7, 3000)
    for t, lat in zip(times, lats):
        mon.observe(float(t), optimized=True, latency_s=float(lat), error=False)
    now = 900.0
    keep = [float(lat) * 1000.0 for t, lat in zip(times, lats) if t > now - 300.0]
    rep = mon.report(now).optimized
    assert rep.requests == len(keep)
    assert rep.p99_ms == float(np.quantile(keep, 0.99))
    assert rep.p50_ms == float(np.quantile(keep, 0.5))


def test_sample_exactly_window_s_old_is_out() -> None:
    mon = SloMonitor(S)
    mon.observe(100.0, optimized=True, latency_s=1.0, error=True)
    assert mon.report(399.999).optimized.requests == 1
    assert mon.report(400.0).optimized.requests == 0
    assert mon.report(400.0).optimized.p99_ms is None


def feed(
    mon: SloMonitor,
    n: int,
    *,
    t0: float = 0.0,
    optimized: bool = True,
    latency_s: float = 0.1,
    error: bool = False,
    quality: float | None = 0.9,
) -> None:
    for i in range(n):
        mon.observe(t0 + i * 0.01, optimized=optimized, latency_s=latency_s, error=error, quality=quality)


def test_latency_breach_needs_min_samples() -> None:
    mon = SloMonitor(S)
    feed(mon, 49, latency_s=0.6)
    assert mon.breach(1.0) is None
    check = mon.report(1.0).optimized.checks[0]
    assert (check.name, check.judged, check.compliant, check.samples) == ("latency_p99_ms", False, True, 49)
    feed(mon, 1, t0=0.9, latency_s=0.6)
    assert mon.breach(1.0) == ["latency_p99_ms"]
    rep = mon.report(1.0)
    assert not rep.compliant and rep.optimized.p99_ms == pytest.approx(600.0)


def test_p99_exactly_at_threshold_is_compliant() -> None:
    mon = SloMonitor(S)
    feed(mon, 100, latency_s=0.5)
    assert mon.breach(2.0) is None


def test_quality_and_error_breaches() -> None:
    mon = SloMonitor(S)
    feed(mon, 60, quality=0.69)
    assert mon.breach(1.0) == ["quality_min"]
    mon = SloMonitor(S)
    feed(mon, 99)
    feed(mon, 1, t0=0.99, error=True)  # 1 % exactly: compliant
    assert mon.breach(1.0) is None
    feed(mon, 1, t0=0.995, error=True, latency_s=None)  # type: ignore[arg-type]
    assert mon.breach(1.0) == ["error_rate_max"]
    assert mon.report(1.0).optimized.error_rate == pytest.approx(2 / 101)


def test_baseline_traffic_is_reported_but_never_breaches() -> None:
    mon = SloMonitor(S)
    feed(mon, 100, optimized=False, latency_s=2.0, error=True, quality=0.1)
    rep = mon.report(2.0)
    assert rep.breached == [] and rep.compliant and mon.breach(2.0) is None
    assert rep.baseline.p99_ms == pytest.approx(2000.0) and not rep.baseline.compliant
    assert rep.optimized.requests == 0 and rep.optimized.compliant
    assert rep.evidence()["baseline_error_rate"] == 1.0


def test_discard_before_forgets_only_older_optimised_samples() -> None:
    mon = SloMonitor(S)
    feed(mon, 100, latency_s=1.0)
    feed(mon, 10, t0=50.0, latency_s=0.2)
    feed(mon, 10, t0=50.0, optimized=False)
    mon.discard_before(50.0)
    rep = mon.report(51.0)
    assert rep.optimized.requests == 10 and rep.optimized.p99_ms == pytest.approx(200.0)
    assert rep.baseline.requests == 10


def test_max_samples_caps_memory() -> None:
    mon = SloMonitor(SloSettings(min_samples=5, max_samples=100))
    for i in range(250):
        mon.observe(i * 0.001, optimized=True, latency_s=i / 1000.0, error=False, quality=None)
    rep = mon.report(0.3).optimized
    assert rep.requests == 100
    assert rep.p50_ms == float(np.percentile([i for i in range(150, 250)], 50))


def test_non_finite_or_missing_values_are_ignored() -> None:
    mon = SloMonitor(S)
    mon.observe(1.0, optimized=True, latency_s=float("nan"), error=False, quality=float("inf"))
    mon.observe(1.0, optimized=True, latency_s=None, error=False, quality=None)
    rep = mon.report(1.0).optimized
    assert (rep.requests, rep.p99_ms, rep.mean_quality) == (2, None, None)
