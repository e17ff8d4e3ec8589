"""The guards read what the learner reads (issue 22), through the real proxy driven by the openai SDK.

A loopback upstream answers with more words the hotter the temperature it is sent
(10 + 60·temperature), and also serves the judge model: the judge reads the answer in its
prompt and scores it by length (a truthful judge when longer is really better; a constant one
when it sees no difference). The policy always takes the hottest temperature on offer, so
tuned answers are longer and cost more tokens than the holdout's (the client's own
temperature, 0.2), while the automatic score is 1 for both.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from aiohttp import web

from policies.base import Choice
from policies.records import Arm, RequestContext
from policies.thompson import ThompsonGaussianPolicy
from proxy.learning import extract_answer
from proxy.runtime import Runtime
from tests.conftest import make_config
from tests.support.loop_thread import AppInThread, serve_app
from tests.support.servers import RunningThermostat, free_port, start_thermostat

CAP = 200  # the client's max_tokens: never binding here
TEMPERATURE = 0.2  # the client's temperature: 22 words
LONG = 25  # the length-judge's line: above it an answer scores 9, else 3


class Hottest(ThompsonGaussianPolicy):
    """Always the hottest temperature on offer, and the client's max_tokens (its statistics still update)."""

    @staticmethod
    def _best(arms: Sequence[Arm]) -> int:
        return max(range(len(arms)), key=lambda i: (arms[i].temperature or 0.0, arms[i].max_tokens or 0))

    def propensities(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm]) -> np.ndarray:
        p = np.zeros(len(arms))
        p[self._best(arms)] = 1.0
        return p

    def choose(self, ctx: RequestContext, baseline: Arm, arms: Sequence[Arm], rng: np.random.Generator) -> Choice:
        return Choice(index=self._best(arms), propensity=1.0)


class LengthWorld:
    """Chat answers of max_tokens // 2 words; judge replies by a rule over the judged answer's length."""

    def __init__(self, judge_rule: str) -> None:
        self.judge_rule = judge_rule
        self.port = free_port()
        self.temperatures_seen: list[float] = []
        self._server: AppInThread | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if body["model"] == "judge-1":
            text = "\n".join(m["content"] for m in body["messages"])
            answer = extract_answer(text) or ""
            words = len(answer.split())
            score = (9 if words > LONG else 3) if self.judge_rule == "length" else 5
            content, usage = f'{{"score": {score}, "reason": "r"}}', {"prompt_tokens": 50, "completion_tokens": 5}
        else:
            temperature = float(body.get("temperature", 1.0))
            self.temperatures_seen.append(temperature)
            n = min(int(body.get("max_tokens") or CAP), 10 + int(60 * temperature))
            content = " ".join(f"w{i}" for i in range(n))
            usage = {"prompt_tokens": 10, "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}], "usage": usage,
        })

    def start(self) -> LengthWorld:
        self._server = serve_app(lambda app: app.router.add_post("/v1/chat/completions", self._handle), port=self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def _running(judge_rule: str, tmp: Any) -> tuple[LengthWorld, RunningThermostat]:
    world = LengthWorld(judge_rule).start()
    cfg = make_config(
        f"http://127.0.0.1:{world.port}/v1", tmp,
        optimization={"mode": "general", "seed": 5, "holdout_fraction": 0.25},
        slo={"quality_min": 0.0, "min_samples": 10_000},  # only the per-task guards are under test
        judge={"enabled": True, "model": "judge-1", "sample_rate": 0.3, "max_concurrency": 4},
        rollout={"min_samples_for_promotion": 100},
    )
    rt = Runtime(cfg)
    rt.bandit.policy = Hottest.from_settings(thompson=cfg.policy.thompson, linucb=cfg.policy.linucb)
    return world, start_thermostat(cfg, rt)


def _drive(t: RunningThermostat, n: int, stop_on_rollback: bool = False) -> list[str]:
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "qa"})
    modes = []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model="m-1", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=CAP, temperature=TEMPERATURE, user=f"u{i}",  # type: ignore[arg-type]
        )
        modes.append(raw.http_response.headers["x-thermostat-mode"])
        if stop_on_rollback and modes[-1] == "rollback":
            break
    return modes


def _judge_idle(t: RunningThermostat) -> None:
    judge = t.runtime.judge
    assert judge is not None
    for _ in range(200):
        if judge.queue.empty():
            break
        time.sleep(0.05)
    time.sleep(0.3)  # the last calls in flight
    t.flush(0.1)


@pytest.fixture(scope="module")
def truthful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LengthWorld, RunningThermostat]]:
    world, t = _running("length", tmp_path_factory.mktemp("truthful"))
    yield world, t
    t.stop()
    world.stop()


def test_a_judged_gain_is_seen_by_slo_status_versus_holdout_and_promotion(truthful: tuple[LengthWorld, RunningThermostat]) -> None:
    """Truthful judge, real gain: every reader sees it, undiluted by unjudged requests.

    Tuned traffic is the hottest temperature once the temperature stage has its signals (and
    its exploration before): the truth is the judged mean of the tuned requests against the
    holdout's (3 - 1) / 9, which the log gives exactly."""
    world, t = truthful
    modes = _drive(t, 700)
    _judge_idle(t)
    assert {"optimized", "holdout"} <= set(modes) and "rollback" not in modes
    assert max(world.temperatures_seen) > TEMPERATURE  # tuned answers are hotter, longer (and costlier)
    log = t.call(t.runtime.sink.fetch_decisions(limit=10_000))
    judged = {m: [r.feedback_quality for r in log if r.mode == m and r.feedback_source == "judge"] for m in ("optimized", "holdout")}
    truth = float(np.mean(judged["optimized"]) - np.mean(judged["holdout"]))
    assert np.mean(judged["holdout"]) == pytest.approx(2 / 9) and truth > 0.3

    status = httpx.get(f"{t.base}/api/optimization/slo-status", timeout=10).json()
    (task,) = [x for x in status["tasks"] if x["task_type"] == "qa"]
    assert task["quality_kind"] == "judge" and task["rolled_back"] is False
    assert task["optimised_mean"] - task["holdout_mean"] == pytest.approx(truth, rel=0.05)  # the monitor also counts guards-only judgments
    assert task["quality_difference"][0] > 0 and task["quality"] == "better"
    kinds = {k["kind"]: k for k in task["signals"]}
    judge = kinds["judge"]
    assert judge["holdout_n"] >= 0.5 * judge["optimised_n"] > 0  # the holdout is judged more often (0.9 vs 0.3)
    assert kinds["automatic"]["verdict"] == "not_yet_known"  # the automatic score sees nothing here
    assert task["cost"]["verdict"] == "costlier"  # ... and the gain is what keeps it: costlier with a sure gain
    assert "judged quality" in task["summary"] and "signals" in task["summary"]

    perf = httpx.get(f"{t.base}/api/optimization/performance", timeout=10).json()
    (row,) = [x for x in perf["tasks"] if x["task_type"] == "qa"]
    metrics = {m["metric"]: m for m in row["versus_holdout"]["metrics"]}
    assert metrics["quality_judge"]["difference"] == pytest.approx(truth, abs=1e-9)  # not diluted by unjudged rows
    assert metrics["quality_automatic"]["difference"] == 0.0 and row["versus_holdout"]["verdict"] == "better"

    quality = httpx.get(f"{t.base}/api/optimization/quality", timeout=10).json()  # /quality: the same per-kind comparison
    (qrow,) = [x for x in quality["tasks"] if x["task_type"] == "qa"]
    by_kind = {m["metric"]: m for m in qrow["by_signal"]}
    assert by_kind["quality_judge"]["difference"] == pytest.approx(truth, abs=1e-9) and by_kind["quality_judge"]["verdict"] == "better"
    assert by_kind["quality_judge"]["optimized_n"] == len(judged["optimized"])  # judged rows only, never an unscored 1.0
    assert by_kind["quality_automatic"]["difference"] == 0.0

    rollout = httpx.get(f"{t.base}/api/optimization/rollout-status", timeout=10).json()
    promotion = rollout["promotion"]
    assert promotion["signal_kind"] == "judge" and promotion["difference_lower"] > 0

    counts = t.runtime.judge.counts  # type: ignore[union-attr]
    assert counts["sampled"] > 0
    assert t.runtime.signal_book.results.get(("judge", "guards_only"), 0) > 0  # holdout judged past sample_rate: guards only


@pytest.fixture(scope="module")
def blind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LengthWorld, RunningThermostat]]:
    world, t = _running("constant", tmp_path_factory.mktemp("blind"))
    yield world, t
    t.stop()
    world.stop()


def test_costlier_tuning_without_a_quality_gain_is_rolled_back(blind: tuple[LengthWorld, RunningThermostat]) -> None:
    """Regression (issue 22): tuned traffic paid more tokens for no gain and nothing rolled back."""
    world, t = blind
    modes = _drive(t, 1500, stop_on_rollback=True)
    assert modes[-1] == "rollback", f"never rolled back after {len(modes)} requests"
    t.flush(0.2)
    status = httpx.get(f"{t.base}/api/optimization/slo-status", timeout=10).json()
    (task,) = [x for x in status["tasks"] if x["task_type"] == "qa"]
    assert task["rolled_back"] and task["cost"]["verdict"] == "costlier" and "cost" in task["reason"]
    events = t.call(t.runtime.sink.fetch_events(limit=20))
    (rollback,) = [e for e in events if e.kind == "rollback" and e.actor == "conservative"]
    assert rollback.evidence["cost"]["verdict"] == "costlier"


def test_explicit_feedback_reaches_the_guards_like_with_like(truthful: tuple[LengthWorld, RunningThermostat]) -> None:
    """Explicit scores for a tenth of the requests: compared explicit against explicit, never against unscored 1.0s."""
    world, t = truthful
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "rated"})
    for i in range(600):
        raw = client.chat.completions.with_raw_response.create(
            model="m-1", messages=[{"role": "user", "content": f"q {i}"}], max_tokens=CAP, temperature=TEMPERATURE, user=f"r{i}",  # type: ignore[arg-type]
        )
        if i % 10:
            continue
        mode = raw.http_response.headers["x-thermostat-mode"]
        rid = raw.http_response.headers["x-request-id"]
        quality = 0.9 if mode == "optimized" else 0.5
        r = httpx.post(f"{t.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": quality}}, timeout=10)
        assert r.status_code == 200, r.text
    _judge_idle(t)
    status = httpx.get(f"{t.base}/api/optimization/slo-status", timeout=10).json()
    (task,) = [x for x in status["tasks"] if x["task_type"] == "rated"]
    kinds = {k["kind"]: k for k in task["signals"]}
    assert task["quality_kind"] == "explicit"
    assert kinds["explicit"]["optimised_mean"] == pytest.approx(0.9) and kinds["explicit"]["holdout_mean"] == pytest.approx(0.5)
    assert kinds["explicit"]["optimised_n"] + kinds["explicit"]["holdout_n"] == 60
    perf = httpx.get(f"{t.base}/api/optimization/performance", timeout=10).json()
    (row,) = [x for x in perf["tasks"] if x["task_type"] == "rated"]
    metrics = {m["metric"]: m for m in row["versus_holdout"]["metrics"]}
    assert metrics["quality_explicit"]["difference"] == pytest.approx(0.4)
