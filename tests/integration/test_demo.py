"""The demo's simulated clients: traffic through the proxy, feedback through the control API."""

from __future__ import annotations

import asyncio
import threading

from proxy import demo_traffic
from proxy.config import build_config
from proxy.simulator_server import start_simulator
from tests.support.servers import start_thermostat


def test_demo_traffic_posts_feedback_that_reaches_the_log(tmp_path) -> None:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    handle: dict[str, object] = {}

    def sim() -> None:
        asyncio.set_event_loop(loop)
        handle["sim"] = loop.run_until_complete(start_simulator("127.0.0.1", 0, seed=1, time_scale=0.0))
        started.set()
        loop.run_forever()

    threading.Thread(target=sim, daemon=True).start()
    assert started.wait(10)
    sim_url = handle["sim"].url  # type: ignore[attr-defined]
    cfg = build_config(
        {"server": {"data_dir": str(tmp_path)}, "upstreams": [{"name": "sim", "base_url": sim_url}],
         "optimization": {"mode": "general", "seed": 2}, "storage": {"flush_interval_s": 0.05}},
        environ={},
    )
    running = start_thermostat(cfg)
    try:
        async def drive() -> None:
            try:
                await asyncio.wait_for(demo_traffic.run(running.base, 50.0), timeout=1.5)
            except TimeoutError:
                pass

        asyncio.run(drive())
        running.flush(0.2)
        rows = running.call(running.runtime.sink.fetch_decisions(limit=500))
        with_feedback = [r for r in rows if r.feedback_quality is not None]
        assert len(rows) >= 10 and len(with_feedback) >= len(rows) - 1  # the last one may still be in flight
        assert {r.task_type for r in rows} == {"code", "creative", "summarise"}
        assert all(0.0 <= r.feedback_quality <= 1.0 for r in with_feedback)
    finally:
        running.stop()
        loop.call_soon_threadsafe(loop.stop)
