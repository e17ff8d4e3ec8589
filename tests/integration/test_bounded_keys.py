"""Client-controlled keys are bounded: long values get a 400, values past the caps fold into 'other'."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policies.base import RESERVED_PREFIX
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import RunningThermostat, start_thermostat

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture()
def capped(upstream: FakeUpstream, tmp_path: Path) -> Iterator[RunningThermostat]:
    cfg = make_config(
        upstream.url,
        tmp_path,
        server={"data_dir": str(tmp_path), "max_task_types": 3, "max_models_per_upstream": 2, "max_task_type_bytes": 16, "max_model_bytes": 24},
        upstreams=[{
            "name": "fake", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0,
            "models_config": [{"pattern": "fixed-*", "fixed_temperature": 1.0}],
        }],
        baseline={"code": {"temperature": 0.3}},
        optimization={"mode": "general", "policy": "thompson_gaussian", "seed": 1},
    )
    running = start_thermostat(cfg)
    yield running
    running.stop()


def _post(t: RunningThermostat, model: str = "echo-1", task: str = "chat") -> httpx.Response:
    return httpx.post(f"{t.url}/chat/completions", json={"model": model, "messages": MESSAGES}, headers={"x-task-type": task}, timeout=10)


def test_too_long_task_type_and_model_get_a_400_in_openai_shape(capped: RunningThermostat) -> None:
    assert _post(capped, task="t" * 16).status_code == 200
    r = _post(capped, task="t" * 17)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_task_type"
    assert _post(capped, model="m" * 24).status_code == 200
    r = _post(capped, model="m" * 25)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == ("invalid_model", "model", "invalid_request_error")
    r = _post(capped, model="é" * 13)  # 26 bytes in UTF-8, 13 characters
    assert r.status_code == 400


def test_task_types_and_models_past_the_cap_fold_into_other(capped: RunningThermostat, upstream: FakeUpstream) -> None:
    rt = capped.runtime
    # "code" (configured baseline) is admitted up front; two more fit, then everything is "other"
    ids = []
    for task in ("a", "b", "c", "d", "e", "code"):
        r = _post(capped, task=task)
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    capped.flush()
    tasks = [rt.registry.get(i, time.time())[0].context.task_type for i in ids]  # type: ignore[index]
    assert tasks == ["a", "b", "other", "other", "other", "code"]
    assert rt.task_types.seen == {"code", "a", "b"}
    assert rt.metrics.folded_keys.labels("task_type")._value.get() == 3  # c, d, e

    # models: two per upstream, then "other"; a fixed-temperature model keeps its limits when folded
    for model in ("m1", "m2", "m3", "fixed-9"):
        assert _post(capped, model=model, task="a").status_code == 200
    assert upstream.last().body["model"] == "fixed-9"  # the body forwarded is the client's
    assert upstream.last().body.get("temperature") in (None, 1.0)
    assert rt.metrics.folded_keys.labels("model")._value.get() == 3  # echo-1 and m1 fit; m2, m3, fixed-9 fold
    assert rt.limits_for("fake", "other:fixed-*").fixed_temperature == 1.0
    keys = {key.split("|")[1] for key in rt.policy.snapshot() if not key.startswith(RESERVED_PREFIX)}  # not the discount epoch
    assert keys <= {"echo-1@fake", "m1@fake", "other@fake", "other:fixed-*@fake"}  # statistics per model and upstream
    body = httpx.get(f"{capped.base}/metrics", timeout=5).text
    assert "thermostat_folded_keys_total{kind=\"task_type\"} 3.0" in body, [x for x in body.splitlines() if "folded" in x]
    assert "thermostat_event_loop_lag_seconds_bucket" in body


def test_policy_buckets_past_max_buckets_are_counted(upstream: FakeUpstream, tmp_path: Path) -> None:
    cfg = make_config(
        upstream.url, tmp_path,
        optimization={"mode": "general", "policy": "thompson_gaussian", "seed": 1}, policy={"thompson": {"max_buckets": 1}},
    )
    t = start_thermostat(cfg)
    try:
        for task in ("a", "b", "c"):
            assert _post(t, task=task).status_code == 200
        t.flush()
        assert {key.split("|")[0] for key in t.runtime.policy.snapshot() if not key.startswith(RESERVED_PREFIX)} == {"a", "other"}
        deadline = time.monotonic() + 30  # exported by the 1 s ticker; the bound is for a loaded machine
        pattern = 'thermostat_folded_keys_total{kind="bucket"}'
        while pattern not in httpx.get(f"{t.base}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "bucket folds not exported"
            time.sleep(0.1)
        assert t.runtime.folded_buckets.seen >= 2  # b and c (choice and update each)
    finally:
        t.stop()
