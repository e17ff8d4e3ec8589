"""SLO monitor: rolling windows over optimised and baseline traffic, and breach detection.

Three SLOs, judged on the last ``slo.window_s`` seconds:

- ``latency_p99_ms``: p99 latency (ms) must be ``<= slo.latency_p99_ms``
- ``quality_min``: mean quality must be ``>= slo.quality_min``
- ``error_rate_max``: errors / requests must be ``<= slo.error_rate_max``

Optimised and baseline traffic are kept apart: only optimised traffic can breach
(Thermostat is answerable for what it changed), baseline traffic is reported
beside it so an operator can tell "we made it slow" from "upstream is slow".
An SLO is judged only once its window holds ``slo.min_samples`` samples; before
that it counts as compliant (``judged=False``).

Quantiles use the same definition as ``numpy.quantile``/``numpy.percentile``
with the default ``method="linear"`` (Hyndman & Fan type 7), including numpy's
two-sided interpolation, so the values equal numpy's on the same samples.

Cost: each metric keeps a deque in arrival order (pruned by time) and a sorted
list (``bisect``), so `observe` is O(log n) plus a memmove, and p50/p95/p99 are
O(1) lookups; `report` can run after every outcome. A window never holds more
than ``slo.max_samples`` samples (oldest dropped first).

API (clock injected)::

    monitor = SloMonitor(settings.slo)
    monitor.observe(now, optimized=True, latency_s=0.42, error=False, quality=0.9)
    monitor.report(now)  -> SloReport   # both traffic classes, every SLO
    monitor.breach(now)  -> list[str] | None   # optimised SLO names breached, judged ones only
    monitor.discard_before(t)           # forget optimised samples older than t (on resume)

Pass ``latency_s=None`` for requests without a meaningful latency (e.g. failed
before a response) and ``quality=None`` when no quality score exists yet.
Observations are expected in roughly increasing ``now`` order (a slightly late
sample is pruned slightly late, nothing worse).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable

import msgspec

from guards.settings import SloSettings

SLO_NAMES: tuple[str, ...] = ("latency_p99_ms", "quality_min", "error_rate_max")


def quantile_sorted(values: list[float], q: float) -> float:
    """`numpy.quantile(values, q)` (method="linear") for an already sorted, non-empty list."""
    n = len(values)
    virtual = (n - 1) * q
    prev = math.floor(virtual)
    if prev >= n - 1:
        return values[-1]
    if prev < 0:
        return values[0]
    a, b = values[prev], values[prev + 1]
    gamma = virtual - prev
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end for accuracy (and monotonicity).
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


class _Window:
    """Samples of one metric inside the time window: arrival order + sorted values."""

    __slots__ = ("_pops", "items", "max_samples", "ordered", "total")

    def __init__(self, max_samples: int) -> None:
        self.items: deque[tuple[float, float]] = deque()
        self.ordered: list[float] = []
        self.total = 0.0
        self._pops = 0
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.items)

    def add(self, t: float, value: float) -> None:
        self.items.append((t, value))
        bisect.insort(self.ordered, value)
        self.total += value
        while len(self.items) > self.max_samples:
            self._pop()

    def _pop(self) -> None:
        _, value = self.items.popleft()
        del self.ordered[bisect.bisect_left(self.ordered, value)]
        self.total -= value
        self._pops += 1
        if not self.items:
            self.total = 0.0
            self._pops = 0
        elif self._pops >= max(1024, len(self.items)):
            # Re-add from scratch now and then so float drift of the running sum
            # cannot accumulate (amortised O(1)).
            self.total = math.fsum(v for _, v in self.items)
            self._pops = 0

    def drop_until(self, t: float, inclusive: bool) -> None:
        items = self.items
        while items and (items[0][0] <= t if inclusive else items[0][0] < t):
            self._pop()

    def quantile(self, q: float) -> float | None:
        return quantile_sorted(self.ordered, q) if self.ordered else None

    def mean(self) -> float | None:
        return self.total / len(self.items) if self.items else None


class _Traffic:
    __slots__ = ("errors", "latency_ms", "quality")

    def __init__(self, max_samples: int) -> None:
        self.latency_ms = _Window(max_samples)
        self.quality = _Window(max_samples)
        self.errors = _Window(max_samples)  # one 0/1 sample per request

    def windows(self) -> tuple[_Window, _Window, _Window]:
        return self.latency_ms, self.quality, self.errors


class SloCheck(msgspec.Struct, frozen=True):
    name: str
    threshold: float
    value: float | None
    compliant: bool
    samples: int
    judged: bool  # samples >= min_samples


class TrafficReport(msgspec.Struct, frozen=True):
    traffic: str  # "optimized" or "baseline"
    requests: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_quality: float | None
    error_rate: float | None
    checks: list[SloCheck]
    compliant: bool


class SloReport(msgspec.Struct, frozen=True):
    at: float
    window_s: float
    min_samples: int
    optimized: TrafficReport
    baseline: TrafficReport
    compliant: bool  # optimised traffic meets every judged SLO
    breached: list[str]  # names of breached optimised SLOs

    def evidence(self) -> dict[str, float | int | None]:
        """Flat metric values for a rollback event."""
        o = self.optimized
        b = self.baseline
        return {
            "optimized_p99_ms": o.p99_ms,
            "optimized_mean_quality": o.mean_quality,
            "optimized_error_rate": o.error_rate,
            "optimized_requests": o.requests,
            "baseline_p99_ms": b.p99_ms,
            "baseline_mean_quality": b.mean_quality,
            "baseline_error_rate": b.error_rate,
            "baseline_requests": b.requests,
        }


class SloMonitor:
    """Rolling SLO windows; see the module docstring."""

    def __init__(self, settings: SloSettings) -> None:
        self.settings = settings
        cap = max(settings.max_samples, settings.min_samples, 1)
        self._optimized = _Traffic(cap)
        self._baseline = _Traffic(cap)

    def observe(
        self,
        now: float,
        *,
        optimized: bool,
        latency_s: float | None,
        error: bool,
        quality: float | None = None,
    ) -> None:
        """Record one finished request of the given traffic class."""
        traffic = self._optimized if optimized else self._baseline
        self._prune(traffic, now)
        traffic.errors.add(now, 1.0 if error else 0.0)
        if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
            traffic.latency_ms.add(now, latency_s * 1000.0)
        if quality is not None and math.isfinite(quality):
            traffic.quality.add(now, float(quality))

    def discard_before(self, t: float) -> None:
        """Forget optimised samples observed before `t`, so a resumed phase is judged on its own traffic."""
        for window in self._optimized.windows():
            window.drop_until(t, inclusive=False)

    def _prune(self, traffic: _Traffic, now: float) -> None:
        cutoff = now - self.settings.window_s
        for window in (traffic.latency_ms, traffic.quality, traffic.errors):
            items = window.items
            if items and items[0][0] <= cutoff:  # usually nothing is due: skip the call (`drop_until` checks the same)
                window.drop_until(cutoff, inclusive=True)

    def _traffic_report(self, name: str, traffic: _Traffic, now: float) -> TrafficReport:
        self._prune(traffic, now)
        s = self.settings
        lat, qual, err = traffic.windows()
        p99 = lat.quantile(0.99)
        mean_q = qual.mean()
        error_rate = err.mean()
        checks = [
            self._check("latency_p99_ms", s.latency_p99_ms, p99, len(lat), lambda v: v <= s.latency_p99_ms),
            self._check("quality_min", s.quality_min, mean_q, len(qual), lambda v: v >= s.quality_min),
            self._check("error_rate_max", s.error_rate_max, error_rate, len(err), lambda v: v <= s.error_rate_max),
        ]
        return TrafficReport(
            traffic=name,
            requests=len(err),
            p50_ms=lat.quantile(0.5),
            p95_ms=lat.quantile(0.95),
            p99_ms=p99,
            mean_quality=mean_q,
            error_rate=error_rate,
            checks=checks,
            compliant=all(c.compliant for c in checks),
        )

    def _check(self, name: str, threshold: float, value: float | None, samples: int, ok: Callable[[float], bool]) -> SloCheck:
        judged = samples >= self.settings.min_samples and value is not None
        compliant = True if value is None or not judged else ok(value)
        return SloCheck(name=name, threshold=threshold, value=value, compliant=compliant, samples=samples, judged=judged)

    def report(self, now: float) -> SloReport:
        optimized = self._traffic_report("optimized", self._optimized, now)
        baseline = self._traffic_report("baseline", self._baseline, now)
        breached = [c.name for c in optimized.checks if not c.compliant]
        return SloReport(
            at=now,
            window_s=self.settings.window_s,
            min_samples=self.settings.min_samples,
            optimized=optimized,
            baseline=baseline,
            compliant=not breached,
            breached=breached,
        )

    def breach(self, now: float) -> list[str] | None:
        """Names of optimised-traffic SLOs breached at `now` (judged only), or None."""
        breached = self.report(now).breached
        return breached or None
