"""The model stage's evidence survives a restart: a stand-in shown worse stays off, a proven one keeps its place."""

from __future__ import annotations

import asyncio
from pathlib import Path

from guards.state import InProcessStore
from proxy.decision import ModelEvidence, ModelEvidenceKeeper, ModelStageSettings
from tests.conftest import make_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import start_thermostat

SETTINGS = ModelStageSettings(exploration_share=0.05, max_quality_regression=0.05)


def _evidence_with_verdicts() -> ModelEvidence:
    """On "code" the stand-in is clearly worse; on "summarise" clearly no worse (better)."""
    ev = ModelEvidence(SETTINGS)
    for i in range(400):
        ev.observe("code", None, "judge", 0.9)
        ev.observe("code", "mini", "judge", 0.3)
        ev.observe("summarise", None, "judge", 0.5 if i % 2 else 0.7)
        ev.observe("summarise", "mini", "judge", 0.95)
    return ev


def test_snapshot_and_restore_give_the_same_verdicts_and_report() -> None:
    ev = _evidence_with_verdicts()
    assert (ev.status("code", "mini"), ev.status("summarise", "mini")) == ("worse", "proven")
    again = ModelEvidence(SETTINGS)
    again.restore(ev.snapshot())
    assert again.status("code", "mini") == "worse" and not again.admits("code", "mini")
    assert again.status("summarise", "mini") == "proven"
    assert again.report() == ev.report()


async def test_the_keeper_saves_each_change_and_a_new_process_loads_it() -> None:
    store = InProcessStore()
    ev = ModelEvidence(SETTINGS)
    keeper = ModelEvidenceKeeper(ev, store)
    for _ in range(300):
        ev.observe("code", None, "explicit", 1.0)
        ev.observe("code", "mini", "explicit", 0.0)
        await asyncio.sleep(0)
    await keeper.flush()
    await asyncio.sleep(0)
    await keeper.flush()  # a change made while a save was in flight is saved once more
    fresh = ModelEvidence(SETTINGS)
    await ModelEvidenceKeeper(fresh, store).load()
    assert fresh.snapshot() == ev.snapshot()
    assert fresh.status("code", "mini") == "worse"


def test_a_restarted_thermostat_keeps_a_stand_in_shown_worse_off(upstream: FakeUpstream, tmp_path: Path) -> None:
    ups = [{"name": "fake", "base_url": upstream.url, "models": ["*"], "timeout_s": 2.0, "connect_timeout_s": 1.0,
            "models_config": [{"pattern": "echo-1", "substitutes": ["echo-mini"]}]}]
    cfg = make_config(upstream.url, tmp_path, upstreams=ups, optimization={"mode": "general", "seed": 3})
    first = start_thermostat(cfg)
    try:
        async def shown_worse() -> None:
            models = first.runtime.bandit.models
            for _ in range(300):
                models.observe("code", None, "judge", 0.9)
                models.observe("code", "echo-mini", "judge", 0.2)
            await first.runtime.model_evidence.flush()
            await asyncio.sleep(0.01)
            await first.runtime.model_evidence.flush()

        first.call(shown_worse())
        assert first.runtime.bandit.models.status("code", "echo-mini") == "worse"
    finally:
        first.stop()
    again = start_thermostat(cfg)
    try:
        models = again.runtime.bandit.models
        assert models.status("code", "echo-mini") == "worse" and not models.admits("code", "echo-mini")
    finally:
        again.stop()
