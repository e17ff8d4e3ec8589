"""A silent change of the best temperature is detected on judged holdout quality and flagged (issue 22, "Done when").

Through the real proxy, driven by the openai SDK. A loopback upstream answers every request
with the same number of words (so answer length and truncation never move) and names the
temperature it was sent; it also serves the judge, which scores an answer 9 when that
temperature is the current best, 6 one step away and 3 otherwise (a truthful judge: the
hidden quality is the distance to the best). The client sends 0.5, which is best at first;
then the "model" changes under the same name and 0.7 becomes best. The holdout's judged
quality falls from 8/9 to 2/9 while its automatic score, length and truncation stay the same,
so only the detector on judged holdout quality can see it: before issue 22 the Page–Hinkley
detector read the automatic score alone and the change was never detected (0 of 5 runs).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from aiohttp import web

from proxy.learning import extract_answer
from tests.conftest import make_config
from tests.support.loop_thread import AppInThread, serve_app
from tests.support.servers import RunningThermostat, free_port, start_thermostat

CLIENT_T = 0.5
WORDS = 30


class TemperatureWorld:
    """Answers of a fixed length naming their temperature; a judge that scores by the distance to `best`."""

    def __init__(self) -> None:
        self.best = CLIENT_T
        self.port = free_port()
        self.rng = np.random.default_rng(3)
        self._server: AppInThread | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if body["model"] == "judge-1":
            answer = extract_answer("\n".join(m["content"] for m in body["messages"])) or ""
            found = re.search(r"t=(\d+\.\d+)", answer)
            steps = round(abs(float(found.group(1)) - self.best) / 0.1) if found else 9
            score = int(np.clip((9, 6, 3)[min(steps, 2)] + self.rng.integers(-1, 2), 1, 10))
            content, usage = f'{{"score": {score}, "reason": "r"}}', {"prompt_tokens": 50, "completion_tokens": 5}
        else:
            t = float(body.get("temperature", 1.0))
            content = f"t={t:.2f} " + " ".join(f"w{i}" for i in range(WORDS - 1))
            usage = {"prompt_tokens": 10, "completion_tokens": WORDS}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}], "usage": usage,
        })

    def start(self) -> TemperatureWorld:
        self._server = serve_app(lambda app: app.router.add_post("/v1/chat/completions", self._handle), port=self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TemperatureWorld, RunningThermostat]]:
    world = TemperatureWorld().start()
    cfg = make_config(
        f"http://127.0.0.1:{world.port}/v1", tmp_path_factory.mktemp("tchange"),
        optimization={"mode": "general", "seed": 7, "holdout_fraction": 0.25},
        # only the change detector is under test: no global SLO action, no per-task rollback
        slo={"quality_min": 0.0, "min_samples": 10_000, "max_quality_regression": 0.9, "max_cost_regression": 5.0},
        judge={"enabled": True, "model": "judge-1", "sample_rate": 0.3, "max_concurrency": 4},
    )
    t = start_thermostat(cfg)
    yield world, t
    t.stop()
    world.stop()


def _send(client: openai.OpenAI, n: int, tag: str) -> list[tuple[str, float]]:
    out = []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model="m-1", messages=[{"role": "user", "content": f"{tag} {i}"}], max_tokens=100, temperature=CLIENT_T, user=f"{tag}{i}",  # type: ignore[arg-type]
        )
        content = raw.parse().choices[0].message.content or ""
        out.append((raw.http_response.headers["x-thermostat-mode"], float(content.split()[0].removeprefix("t="))))
    return out


def _idle(t: RunningThermostat) -> None:
    judge = t.runtime.judge
    assert judge is not None
    for _ in range(200):
        if judge.queue.empty():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    t.flush(0.1)


def _task(t: RunningThermostat) -> dict[str, Any]:
    status = httpx.get(f"{t.base}/api/optimization/slo-status", timeout=10).json()
    return next(x for x in status["tasks"] if x["task_type"] == "rewrite")


def test_a_silent_change_of_the_best_temperature_is_detected_on_judged_holdout_quality_and_flagged(
    running: tuple[TemperatureWorld, RunningThermostat],
) -> None:
    world, t = running
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "rewrite"})
    before = _send(client, 400, "a")
    _idle(t)
    events = t.call(t.runtime.sink.fetch_events(limit=100))
    assert not [e for e in events if e.kind == "change_detected"]  # stationary: no false alarm
    late = Counter(temp for mode, temp in before[200:] if mode == "optimized")
    assert late.most_common(1)[0][0] == CLIENT_T, late  # the client's temperature is best and kept

    world.best = 0.7  # the model changes under the same name: same lengths, never cut, automatic score 1
    detected: dict[str, Any] | None = None
    for round_ in range(12):  # bounded: at 0.25 x 0.9 judged holdout per request, a few dozen holdout judgments
        _send(client, 50, f"b{round_}-")
        _idle(t)
        task = _task(t)
        if task["relearning_since"] is not None:
            detected = task
            break
    assert detected is not None, "the change of the best temperature was never detected"
    events = t.call(t.runtime.sink.fetch_events(limit=100))
    (change,) = [e for e in events if e.kind == "change_detected" and e.actor == "conservative"]
    assert change.evidence["stream"] == "judge" and change.evidence["exploration_reopened"] is True  # judged quality, nothing else moved
    assert "holdout judged quality fell" in change.reason
    assert change.evidence["relearning_since"] == pytest.approx(detected["relearning_since"])  # flagged in slo-status

    after = _send(client, 700, "c")
    _idle(t)
    late = Counter(temp for mode, temp in after[350:] if mode == "optimized")
    assert late.most_common(1)[0][0] == pytest.approx(0.7), late  # re-learnt: the new best
    events = t.call(t.runtime.sink.fetch_events(limit=100))
    ended = [e for e in events if e.kind == "relearning_ended" and e.actor == "conservative"]
    assert len(ended) == 1 and ended[0].evidence["signal_kind"] == "judge", [e.kind for e in events]
    assert _task(t)["relearning_since"] is None  # the flag is closed once re-learnt
