"""Simulated clients for `thermostat demo`: steady traffic, and the feedback source chosen.

The bundled simulator's answer quality depends on temperature per task type (code best
near 0.2, creative near 1.0, summarise near 0.5), which the automatic quality signal
cannot see. Where the quality that teaches the policy comes from (`--feedback`):

* ``judge`` (the demo's default): nothing from the clients; Thermostat's own judge, played
  by the simulator (`sim-judge`), scores a sample of answers from their hidden quality;
* ``explicit``: the client posts the simulator's score (`x-sim-quality`) to `record-outcome`;
* ``implicit``: the client asks again (same messages, same `x-thermostat-key`) when an
  answer was poor, which marks the first answer as regenerated;
* ``none``: no quality signal beyond the automatic one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import Literal

import httpx

log = logging.getLogger("thermostat.demo")

# (task type header, system prompt the simulator recognises, the client's own temperature)
CLIENTS: tuple[tuple[str, str, float], ...] = (
    ("code", "You are a senior Python developer.", 0.7),
    ("creative", "You write short fiction and poems.", 0.8),
    ("summarise", "Summarise the user's text in three sentences.", 0.7),
)


FeedbackSource = Literal["judge", "explicit", "implicit", "none"]
FEEDBACK_SOURCES: tuple[str, ...] = ("judge", "explicit", "implicit", "none")
RETRY_BELOW = 0.5  # implicit: a simulated user asks again when the answer's quality is below this
USERS = 50  # simulated users: the assignment (and regeneration) keys


async def run(
    base_url: str, rate_per_s: float, *, admin_token: str | None = None, seed: int = 0, feedback: FeedbackSource = "explicit",
) -> None:
    """Send `rate_per_s` requests a second until cancelled, with the chosen feedback (module docstring)."""
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
            request_headers = {"x-task-type": task, "x-thermostat-key": f"user-{i % USERS}"}
            try:
                r = await client.post("/v1/chat/completions", json=body, headers=request_headers)
                quality = r.headers.get("x-sim-quality")
                if r.status_code == 200 and quality is not None:
                    if feedback == "explicit":
                        await client.post(
                            "/api/optimization/record-outcome",
                            json={"request_id": r.headers["x-request-id"], "outcome": {"quality": float(quality)}},
                        )
                    elif feedback == "implicit" and float(quality) < RETRY_BELOW:
                        await client.post("/v1/chat/completions", json=body, headers=request_headers)
            except httpx.HTTPError as exc:
                log.warning("demo traffic: %s", exc)
            await asyncio.sleep(1.0 / rate_per_s)
