"""Alert webhooks: conditions evaluated off the request path, posted with retries, bounded queue."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiohttp import web

from guards.rollout import RolloutEvent
from proxy.observability import Alert, AlertManager


class _Rt:
    """Just the parts AlertManager reads."""

    def __init__(self) -> None:
        from guards.settings import SloSettings
        from guards.slo import SloMonitor

        self.slo = SloMonitor(SloSettings(min_samples=3, latency_p99_ms=100))

        class _Rollout:
            class state:
                events: list[RolloutEvent] = []

        class _Budget:
            async def status(self, now: float) -> object:
                raise RuntimeError("no store")

        self.rollout = _Rollout()
        self.budget = _Budget()


async def test_webhook_retries_then_delivers() -> None:
    hits: list[dict] = []
    attempts = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        attempts["n"] += 1
        if attempts["n"] == 1:
            return web.Response(status=503)
        hits.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rt = _Rt()
    mgr = AlertManager((f"http://127.0.0.1:{port}/hook",), slo=rt.slo, budget=rt.budget, rollout=rt, interval_s=3600)
    await mgr.start()
    try:
        now = time.time()
        for _ in range(5):
            rt.slo.observe(now, optimized=True, latency_s=0.5, error=False, quality=0.9)
        produced = await mgr.evaluate(now)
        assert [a.name for a in produced] == ["ThermostatSloLatencyViolation"] and produced[0].status == "firing"
        assert await mgr.evaluate(now) == []  # no transition, no new alert
        rt.rollout.state.events.append(RolloutEvent(at=now, kind="rollback", from_="general", to="rollback", reason="manual", actor="token:x"))
        assert [a.name for a in await mgr.evaluate(now)] == ["ThermostatRollback"]
        for _ in range(100):  # the hook appends before its answer reaches the manager, which then counts it sent
            if len(hits) == 2 and mgr.sent == 2:
                break
            await asyncio.sleep(0.05)
        assert [h["name"] for h in hits] == ["ThermostatSloLatencyViolation", "ThermostatRollback"]
        assert attempts["n"] == 3 and mgr.sent == 2 and mgr.failed == 0
    finally:
        await mgr.stop()
        await runner.cleanup()


async def test_full_queue_drops_instead_of_blocking() -> None:
    rt = _Rt()
    mgr = AlertManager(("http://127.0.0.1:9/hook",), slo=rt.slo, budget=rt.budget, rollout=rt, queue_size=1)
    alert = Alert(name="x", severity="warning", status="firing", at=0.0, summary="s")
    assert mgr.enqueue(alert) is True and mgr.enqueue(alert) is False and mgr.dropped == 1
    assert msgspec.json.decode(msgspec.json.encode(alert))["name"] == "x"
