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


MAX_IN_FLIGHT = 256  # past this many unanswered requests the demo skips a beat rather than pile up


async def run(
    base_url: str, rate_per_s: float, *, admin_token: str | None = None, seed: int = 0, feedback: FeedbackSource = "explicit",
    requests: int | None = None,
) -> None:
    """Send `rate_per_s` requests a second until cancelled, with the chosen feedback (module docstring).

    Open loop: request i leaves at start + i / rate whatever earlier answers are doing, as
    independent users do; waiting for each answer before sleeping sent ~3.5 of 5 a second.
    With `requests`, send that many, then wait for every answer and its feedback and return
    (cancelled, the requests still in flight are dropped with their feedback, as when the demo stops).
    """
    rng = random.Random(seed)
    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers, limits=limits) as client:
        try:
            due = loop.time()
            for i in itertools.count() if requests is None else range(requests):
                if len(in_flight) < MAX_IN_FLIGHT:
                    task = asyncio.create_task(_one(client, i, rng.random(), feedback))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                due += 1.0 / rate_per_s
                await asyncio.sleep(max(0.0, due - loop.time()))
            await asyncio.gather(*in_flight)
        finally:
            for task in list(in_flight):
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)


async def _one(client: httpx.AsyncClient, i: int, salt: float, feedback: FeedbackSource) -> None:
    """One simulated user's request, and the feedback it gives."""
    task, system, temperature = CLIENTS[i % len(CLIENTS)]
    body = {
        "model": "sim-1",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"request {i}: {salt:.6f}"}],
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


LOCAL_TASK = "facts"
LOCAL_TEMPERATURE = 1.4  # too hot for short factual answers: the effect `--model local` lets Thermostat find


async def run_local(base_url: str, rate_per_s: float, *, admin_token: str | None = None, feedback: FeedbackSource = "explicit") -> None:
    """`thermostat demo --model local`'s client: factual completions at too hot a temperature, graded.

    Closed loop, at most `rate_per_s`: the one llama.cpp server answers one request at a time,
    so an open loop would only queue. With ``explicit`` feedback the grader's score (1 right,
    0 wrong; `local_model.grade`) is posted to `record-outcome`; with ``none`` nothing is.
    """
    from proxy.demo.local_model import ANSWER, FULL_DISTRIBUTION, MODEL_ALIAS, QUESTIONS, grade

    headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=base_url, timeout=300, headers=headers) as client:
        for i in itertools.count():
            due = loop.time() + 1.0 / rate_per_s
            q = QUESTIONS[i % len(QUESTIONS)]
            body = {"model": MODEL_ALIAS, "prompt": q.prompt, "temperature": LOCAL_TEMPERATURE, **ANSWER, **FULL_DISTRIBUTION}
            try:
                r = await client.post("/v1/completions", json=body, headers={"x-task-type": LOCAL_TASK, "x-thermostat-key": f"user-{i % USERS}"})
                if r.status_code == 200 and feedback == "explicit":
                    score = grade(q, r.json()["choices"][0]["text"])
                    await client.post("/api/optimization/record-outcome", json={"request_id": r.headers["x-request-id"], "outcome": {"quality": score}})
            except httpx.HTTPError as exc:
                log.warning("demo traffic: %s", exc)
            await asyncio.sleep(max(0.0, due - loop.time()))
