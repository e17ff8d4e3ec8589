"""Alert webhooks: the conditions of deploy/prometheus/alerts.yml, evaluated in-process.

A background task evaluates the conditions every `interval_s` seconds (from live state,
never on the request path) and, on each transition (firing / resolved), puts one alert
on a bounded queue; a sender task posts it as JSON to every `[alerts] webhook_urls`
entry with tenacity retries (exponential backoff). A full queue drops the alert and
counts it, so nothing ever blocks or slows client traffic.

Conditions (same thresholds as the Prometheus rules):
- ``ThermostatSloLatencyViolation`` (critical): optimised p99 latency > slo.latency_p99_ms (judged windows only)
- ``ThermostatQualityDegradation`` (critical): optimised mean quality < slo.quality_min (judged only)
- ``ThermostatErrorRateHigh`` (critical): optimised error rate > slo.error_rate_max (judged only)
- ``ThermostatTokenBudgetHigh`` (warning): (used + reserved) > 0.9 × effective budget
- ``ThermostatRollback`` (critical): a rollback event happened since the last evaluation
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

import httpx
import msgspec
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

if TYPE_CHECKING:
    from guards.budget import BudgetStatus
    from guards.slo import SloMonitor
    from proxy.observability.metrics import RolloutSource

log = logging.getLogger("thermostat.alerts")


class BudgetSource(Protocol):
    """The budget guard, read once per evaluation (an async store call)."""

    async def status(self, now: float) -> BudgetStatus: ...


class Alert(msgspec.Struct):
    name: str
    severity: str  # critical | warning
    status: str  # firing | resolved
    at: float
    summary: str
    value: float | None = None
    threshold: float | None = None
    labels: dict[str, str] = {}


def evaluate_conditions(monitor: SloMonitor, now: float, budget: BudgetStatus | None) -> dict[str, tuple[bool, str, str, float | None, float | None]]:
    """name -> (firing, severity, summary, value, threshold) from live state."""
    out: dict[str, tuple[bool, str, str, float | None, float | None]] = {}
    report = monitor.report(now)
    checks = {c.name: c for c in report.optimized.checks}
    for name, slo, severity, what in (
        ("ThermostatSloLatencyViolation", "latency_p99_ms", "critical", "optimised p99 latency (ms)"),
        ("ThermostatQualityDegradation", "quality_min", "critical", "optimised mean quality"),
        ("ThermostatErrorRateHigh", "error_rate_max", "critical", "optimised error rate"),
    ):
        c = checks.get(slo)
        if c is None:
            continue
        firing = c.judged and not c.compliant
        out[name] = (firing, severity, f"{what} {c.value if c.value is not None else 'n/a'} vs threshold {c.threshold:g}", c.value, c.threshold)
    if budget is not None and budget.effective_limit > 0:
        fill = (budget.used + budget.reserved) / budget.effective_limit
        out["ThermostatTokenBudgetHigh"] = (fill > 0.9, "warning", f"token budget {fill:.1%} used (used+reserved of effective limit)", fill, 0.9)
    return out


class AlertManager:
    def __init__(self, urls: tuple[str, ...], *, slo: SloMonitor, budget: BudgetSource, rollout: RolloutSource, interval_s: float = 15.0,
                 queue_size: int = 100, attempts: int = 4, timeout_s: float = 5.0, backoff_max_s: float = 10.0) -> None:
        self.slo = slo
        self.budget = budget
        self.rollout = rollout  # the holder: start-up may swap the controller it holds
        self.urls = tuple(urls)
        self.interval_s = interval_s
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self.firing: dict[str, bool] = {}
        self.dropped = 0
        self.sent = 0
        self.failed = 0
        self._seen_events = len(rollout.rollout.state.events)
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    # ---- producing ------------------------------------------------------------------

    def enqueue(self, alert: Alert) -> bool:
        try:
            self.queue.put_nowait(alert)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alert queue full: dropped %s (%s)", alert.name, alert.status)
            return False

    async def evaluate(self, now: float | None = None) -> list[Alert]:
        """One evaluation: enqueue alerts for transitions and new rollback events; returns them."""
        now = time.time() if now is None else now
        budget: BudgetStatus | None = None
        try:
            budget = await asyncio.wait_for(self.budget.status(now), 1.0)
        except Exception:
            budget = None
        produced: list[Alert] = []
        for name, (firing, severity, summary, value, threshold) in evaluate_conditions(self.slo, now, budget).items():
            if firing != self.firing.get(name, False):
                self.firing[name] = firing
                produced.append(Alert(name=name, severity=severity, status="firing" if firing else "resolved", at=now,
                                      summary=summary, value=value, threshold=threshold))
        events = self.rollout.rollout.state.events
        # The event list is capped (oldest dropped); new events are at the end.
        new = events[max(0, min(self._seen_events, len(events))):] if len(events) >= self._seen_events else events[-1:]
        self._seen_events = len(events)
        for e in new:
            if e.kind == "rollback":
                produced.append(Alert(name="ThermostatRollback", severity="critical", status="firing", at=e.at,
                                      summary=f"rollback from {e.from_}: {e.reason}", labels={"actor": e.actor or "slo"}))
        for alert in produced:
            self.enqueue(alert)
        return produced

    def judge_alert(self, name: str, summary: str) -> None:
        """The judge's circuit breaker opened ("judge_failing") or closed ("judge_recovered")."""
        log.warning("judge %s: %s", name, summary)
        firing = name != "judge_recovered"
        self.enqueue(Alert(name="ThermostatJudgeFailing", severity="warning", status="firing" if firing else "resolved",
                           at=time.time(), summary=summary))

    # ---- sending --------------------------------------------------------------------

    async def _post(self, url: str, alert: Alert) -> None:
        assert self._client is not None
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.2, max=self.backoff_max_s),
            retry=retry_if_exception_type(httpx.HTTPError),
            reraise=True,
        ):
            with attempt:
                resp = await self._client.post(url, content=msgspec.json.encode(alert), headers={"content-type": "application/json"})
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise httpx.HTTPStatusError(f"webhook answered {resp.status_code}", request=resp.request, response=resp)

    async def _send_loop(self) -> None:
        while True:
            alert = await self.queue.get()
            for url in self.urls:
                try:
                    await self._post(url, alert)
                    self.sent += 1
                except Exception as exc:
                    self.failed += 1
                    log.warning("alert %s to %s failed after %d attempts: %s", alert.name, url, self.attempts, exc)

    async def _eval_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.evaluate()
            except Exception:
                log.exception("alert evaluation failed")

    async def start(self) -> None:
        if not self.urls:
            return
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        self._tasks = [asyncio.create_task(self._eval_loop(), name="thermostat-alert-eval"),
                       asyncio.create_task(self._send_loop(), name="thermostat-alert-send")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
