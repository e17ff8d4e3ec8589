"""The loop closes without anyone posting feedback: the judge and regeneration marks, through the real proxy.

The judge test runs Thermostat in front of the simulator, which also acts as the judge
model (`sim-judge`): it scores each answer from the hidden quality it gave it, plus noise.
No explicit feedback is posted, so every quality signal that can see temperature comes from
the judge; the policy must move the creative task's temperature toward the simulator's
hidden optimum (1.0) from the client's 0.6.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from policies.signals import Signal
from proxy.demo.simulator import SimulatorTruth, TaskProfile
from proxy.demo.simulator_server import SimulatorHandle
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, simulator_in_thread, start_thermostat

CLIENT_T = 0.6
CREATIVE = [{"role": "system", "content": "You are a creative writer."}, {"role": "user", "content": "A short poem about the sea."}]


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorHandle]:
    # One task with a clear optimum far from the client's setting; short answers, so no arm truncates.
    truth = SimulatorTruth(tasks={"creative": TaskProfile(best_temperature=1.0, length_median=40, prompt_median=50, length_sigma=0.1)})
    with simulator_in_thread(seed=4, truth=truth) as sim:
        yield sim


@pytest.fixture(scope="module")
def judged(simulator: SimulatorHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(
        simulator.url,
        tmp_path_factory.mktemp("judged"),
        optimization={"mode": "general", "seed": 8, "min_quality_signals": 10, "holdout_fraction": 0.05},
        policy={"grid": {"temperature_steps": 3, "max_tokens_steps": 1}},
        judge={"enabled": True, "model": "sim-judge", "sample_rate": 1.0, "max_concurrency": 4},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def test_judge_alone_moves_temperature_toward_the_hidden_optimum(judged: RunningThermostat) -> None:
    rt = judged.runtime
    assert rt.judge is not None
    client = openai.OpenAI(base_url=judged.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "creative"})
    sent: list[float] = []
    deadline = time.monotonic() + 120  # bounded in time as well as in requests
    for i in range(400):
        if time.monotonic() > deadline:
            break
        if i % 20 == 19:  # learning per request, not per second: a loaded machine's judge must not fall behind
            judged.call(rt.judge.drain(), timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="sim-writer", messages=CREATIVE, temperature=CLIENT_T, max_tokens=200, user=f"u{i}",  # type: ignore[arg-type]
        )
        mode = raw.http_response.headers["x-thermostat-mode"]
        params = dict(p.strip().split("=", 1) for p in raw.http_response.headers["x-thermostat-params"].split(";") if "=" in p)
        if mode == "optimized" and "temperature" in params:
            sent.append(float(params["temperature"]))
    judged.call(rt.judge.drain(), timeout=30)
    assert rt.judge.counts["ok"] >= 100, dict(rt.judge.counts)
    assert rt.bandit.signals.count("creative") >= 10  # judge signals unlocked temperature (tune_temperature = auto)
    late = sent[-100:]
    assert len(late) == 100
    hotter = sum(1 for t in late if t > CLIENT_T + 1e-9)
    colder = sum(1 for t in late if t < CLIENT_T - 1e-9)
    assert hotter > 60 and colder < 15, (hotter, colder)  # mostly toward the optimum (1.0), rarely away
    # Judge tokens were charged to the budget under their own task type.
    text = httpx.get(f"{judged.base}/metrics", timeout=10).text
    assert 'thermostat_judge_requests_total{result="ok"}' in text


@pytest.fixture(scope="module")
def plain(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningThermostat]:
    cfg = make_config(upstream.url, tmp_path_factory.mktemp("regen"), optimization={"mode": "general", "seed": 2},
                      feedback={"regenerated_quality": 0.0, "regenerate_window_s": 600})
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _ask(t: RunningThermostat, messages: list[dict[str, str]], key: str | None) -> str:
    headers = {"x-task-type": "chat"} | ({"x-thermostat-key": key} if key else {})
    client = openai.OpenAI(base_url=t.url, api_key="sk-test", max_retries=0, timeout=10, default_headers=headers)
    raw = client.chat.completions.with_raw_response.create(model="echo-1", messages=messages, max_tokens=300)  # type: ignore[arg-type]
    return raw.http_response.headers["x-request-id"]


def _quality(t: RunningThermostat, rid: str) -> float | None:
    found = t.runtime.registry.get(rid, time.time())
    assert found is not None and found[1] is not None
    return found[1].quality


def _settle(t: RunningThermostat) -> None:
    """The regeneration check runs as a background task after the response; wait for it (bounded)."""
    for _ in range(100):
        if not t.runtime.answers.background:
            break
        time.sleep(0.02)
    t.flush(0.05)


def test_same_messages_twice_marks_the_earlier_decision_regenerated(plain: RunningThermostat) -> None:
    rt = plain.runtime
    messages = [{"role": "user", "content": "name a colour"}]
    first = _ask(plain, messages, "alice")
    _settle(plain)
    assert _quality(plain, first) == 1.0  # automatic: a complete answer
    other_key = _ask(plain, messages, "bob")  # same question, another client: not a retry
    _settle(plain)
    assert _quality(plain, first) == 1.0
    different = _ask(plain, [{"role": "user", "content": "name a fruit"}], "alice")  # another question
    _settle(plain)
    assert _quality(plain, first) == 1.0
    second = _ask(plain, messages, "alice")  # the retry
    _settle(plain)
    assert _quality(plain, first) == 0.0  # [feedback] regenerated_quality
    assert _quality(plain, second) == 1.0 and _quality(plain, other_key) == 1.0 and _quality(plain, different) == 1.0
    assert rt.signal_book.sources.get(first) == "implicit"
    assert rt.regeneration.counts["chat"] == 1
    assert rt.metrics.regenerations.labels("chat")._value.get() == 1.0  # thermostat_regenerations_total{task}
    rows = plain.call(rt.sink.fetch_decisions(limit=50))
    row = next(r for r in rows if r.request_id == first)
    assert row.feedback_quality == 0.0


def test_no_client_key_no_regeneration(plain: RunningThermostat) -> None:
    messages = [{"role": "user", "content": "name a planet"}]
    first = _ask(plain, messages, None)
    _settle(plain)
    _ask(plain, messages, None)
    _settle(plain)
    assert _quality(plain, first) == 1.0  # anonymous identical prompts may be different people


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_breaks_its_json_schema_scores_lower(plain: RunningThermostat, stream: bool) -> None:
    client = openai.OpenAI(base_url=plain.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "extraction"})
    qualities = {}
    for label, answer in (("valid", '{"name": "Ada"}'), ("invalid", '{"name": 5}')):
        raw = client.chat.completions.with_raw_response.create(
            model="raw-echo", messages=[{"role": "user", "content": answer}], response_format=SCHEMA_FORMAT, stream=stream,  # type: ignore[arg-type]
        )
        if stream:
            for _ in raw.parse():
                pass
        _settle(plain)
        qualities[label] = _quality(plain, raw.http_response.headers["x-request-id"])
    # Both parse as JSON, so the automatic score alone could not tell them apart.
    assert qualities == {"valid": 1.0, "invalid": plain.runtime.config.policy.quality.schema_invalid_score}


def test_judge_then_explicit_counts_one_temperature_signal(plain: RunningThermostat) -> None:
    """Each request is one piece of evidence for tune_temperature = auto, whichever sources scored it."""
    rt = plain.runtime
    client = openai.OpenAI(base_url=plain.url, api_key="sk-test", max_retries=0, timeout=10, default_headers={"x-task-type": "review"})
    rid = client.chat.completions.with_raw_response.create(
        model="echo-1", messages=[{"role": "user", "content": "review this"}], max_tokens=300,  # type: ignore[arg-type]
    ).http_response.headers["x-request-id"]
    _settle(plain)
    assert rt.bandit.signals.count("review") == 0
    assert plain.call(rt.deliver(Signal(request_id=rid, quality=0.4, source="judge", at=time.time()))) == "applied"
    assert rt.bandit.signals.count("review") == 1 and _quality(plain, rid) == 0.4
    r = httpx.post(f"{plain.base}/api/optimization/record-outcome", json={"request_id": rid, "outcome": {"quality": 0.9}}, timeout=10)
    assert r.status_code == 200, r.text
    assert rt.bandit.signals.count("review") == 1 and _quality(plain, rid) == 0.9  # explicit wins, counted once
