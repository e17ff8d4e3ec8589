"""`GET /api/optimization/quality` against the real app: signals by source, judge agreement, the trust flag."""

from __future__ import annotations

import math

import httpx
import numpy as np

from policies.agreement import spearman
from policies.signals import Signal
from tests.control.conftest import api
from tests.support.servers import RunningThermostat


def deliver(t: RunningThermostat, signal: Signal) -> str:
    return t.call(t.runtime.deliver(signal))


def explicit(t: RunningThermostat, rid: str, quality: float, overwrite: bool = False) -> None:
    r = api(t, "POST", "/record-outcome", json={"request_id": rid, "outcome": {"quality": quality}, "overwrite": overwrite})
    assert r.status_code in (200, 201), r.text


def tasks(t: RunningThermostat) -> dict[str, dict]:
    r = api(t, "GET", "/quality", params={"window_s": 3600})
    assert r.status_code == 200, r.text
    return {task["task_type"]: task for task in r.json()["tasks"]}


def test_sources_agreement_and_the_flag(own_ctl: RunningThermostat) -> None:
    t = own_ctl
    code, chat = t.ids["code"], t.ids["chat"]  # type: ignore[attr-defined]
    # chat: 2 explicit, 3 judge, 4 regeneration marks, the other 11 automatic.
    for rid in chat[:2]:
        explicit(t, rid, 0.9)
    for rid in chat[2:5]:
        assert deliver(t, Signal(rid, 0.6, "judge")) == "applied"
    for rid in chat[5:9]:
        assert deliver(t, Signal(rid, 0.0, "implicit")) == "applied"
    t.flush()
    body = tasks(t)["chat"]
    assert body["requests"] == 20
    assert body["signals"] == {"explicit": 2, "judge": 3, "judge_pairwise": 0, "implicit": 4, "automatic": 11, "none": 0}
    assert body["regeneration_rate"] == 4 / 20
    assert body["judge"]["n"] == 0 and body["judge"]["spearman"] is None and body["judge"]["trusted"] is True

    # code: the judge scores 30 requests, then explicit feedback ranks them the other way round.
    judged = [round(0.1 + 0.8 * i / 29, 6) for i in range(30)]
    for rid, q in zip(code[:30], judged, strict=True):
        assert deliver(t, Signal(rid, q, "judge")) == "applied"
    against = [round(1 - q, 6) for q in judged]
    for rid, q in zip(code[:29], against[:29], strict=True):
        explicit(t, rid, q)
    assert tasks(t)["code"]["judge"]["trusted"] is True  # 29 pairs: not enough to distrust
    explicit(t, code[29], against[29])
    t.flush()
    body = tasks(t)["code"]
    j = body["judge"]
    assert j["n"] == 30 and j["trusted"] is False and j["min_agreement"] == 0.3 and j["min_pairs"] == 30
    assert math.isclose(j["spearman"], -1.0, abs_tol=1e-12)
    assert math.isclose(j["mean_difference"], float(np.mean(np.array(judged) - np.array(against))), abs_tol=1e-12)
    assert body["signals"]["explicit"] == 30 and body["signals"]["judge"] == 0 and body["signals"]["automatic"] == 10

    # Flagged: the judge's next score for "code" is not delivered (counted), "chat" is unaffected.
    before = t.runtime.signal_book.results.get(("judge", "untrusted"), 0)
    assert deliver(t, Signal(code[30], 0.9, "judge")) == "untrusted"
    assert t.runtime.signal_book.results[("judge", "untrusted")] == before + 1
    assert deliver(t, Signal(chat[9], 0.9, "judge")) == "applied"
    t.flush()
    assert tasks(t)["code"]["signals"]["judge"] == 0  # its untrusted score stayed out of the log

    # Explicit feedback revised to agree with the judge: agreement recovers, the judge counts again.
    for rid, q in zip(code[:25], judged[:25], strict=True):
        explicit(t, rid, q, overwrite=True)
    j = tasks(t)["code"]["judge"]
    expected = spearman(judged, judged[:25] + against[25:])
    assert expected is not None and math.isclose(j["spearman"], expected, abs_tol=1e-12) and j["n"] == 30
    assert expected < 0.3 and j["trusted"] is False  # 0.296: still just below
    assert deliver(t, Signal(code[31], 0.9, "judge")) == "untrusted"
    explicit(t, code[25], judged[25], overwrite=True)
    j = tasks(t)["code"]["judge"]
    expected = spearman(judged, judged[:26] + against[26:])
    assert expected is not None and expected >= 0.3 and math.isclose(j["spearman"], expected, abs_tol=1e-12)
    assert j["trusted"] is True
    assert deliver(t, Signal(code[32], 0.9, "judge")) == "applied"


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": False}}}


def test_validator_failure_rate(own_ctl: RunningThermostat) -> None:
    t = own_ctl
    with httpx.Client(timeout=10) as client:
        for answer in ('{"name": "Ada"}', '{"name": 5}', '{"nom": "Ada"}'):
            r = client.post(f"{t.url}/chat/completions", headers={"x-task-type": "extraction"}, json={
                "model": "raw-echo", "messages": [{"role": "user", "content": answer}], "response_format": SCHEMA_FORMAT})
            assert r.status_code == 200, r.text
    t.flush()
    body = tasks(t)
    extraction = body["extraction"]
    assert extraction["validation_checked"] == 3 and extraction["validation_failed"] == 2
    assert extraction["validation_failure_rate"] == 2 / 3
    assert body["code"]["validation_checked"] == 0 and body["code"]["validation_failure_rate"] is None  # nothing asked
    # The stored reasons: schema paths and error kinds, never the answer's own text ("Ada", "nom").
    assert extraction["validator_reasons"] == {
        "response_format: additionalProperties (AdditionalProperties); required (Required)": 1,
        "response_format: properties/name/type (Type)": 1,
    }
    logs = api(t, "GET", "/logs", params={"task_type": "extraction", "limit": 10})
    assert logs.status_code == 200, logs.text
    reasons = sorted(str(item["validator_reason"]) for item in logs.json()["items"])
    assert reasons == sorted(["None", *extraction["validator_reasons"]])
    assert not any("Ada" in r or "nom" in r for r in reasons)
