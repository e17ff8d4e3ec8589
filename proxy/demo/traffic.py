"""Simulated clients for `thermostat demo`: steady traffic plus delayed feedback.

The bundled simulator's answer quality depends on temperature per task type (code best
near 0.2, creative near 1.0, summarise near 0.5), which the automatic quality signal
cannot see; a real deployment learns it from feedback. The demo therefore plays a
client that posts the simulator's quality score (`x-sim-quality`) back through
`record-outcome`, so the dashboard shows the policy moving toward each task's optimum.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random

import httpx

log = logging.getLogger("thermostat.demo")

# (task type header, system prompt the simulator recognises, the client's own temperature)
CLIENTS: tuple[tuple[str, str, float], ...] = (
    ("code", "You are a senior Python developer.", 0.7),
    ("creative", "You write short fiction and poems.", 0.8),
    ("summarise", "Summarise the user's text in three sentences.", 0.7),
)


async def run(base_url: str, rate_per_s: float, *, admin_token: str | None = None, seed: int = 0) -> None:
    """Send `rate_per_s` requests a second until cancelled; post feedback for each answer."""
    rng = random.Random(seed)
    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as client:
        for i in itertools.count():
            task, system, temperature = CLIENTS[i % len(CLIENTS)]
            body = {
                "model": "sim-1",
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"request {i}: {rng.random():.6f}"}],
                "temperature": temperature,
                "max_tokens": 800,
            }
            try:
                r = await client.post("/v1/chat/completions", json=body, headers={"x-task-type": task})
                quality = r.headers.get("x-sim-quality")
                if r.status_code == 200 and quality is not None:
                    await client.post(
                        "/api/optimization/record-outcome",
                        json={"request_id": r.headers["x-request-id"], "outcome": {"quality": float(quality)}},
                    )
            except httpx.HTTPError as exc:
                log.warning("demo traffic: %s", exc)
            await asyncio.sleep(1.0 / rate_per_s)
