"""The demo reports each request's cost in dollars, from the simulated models' own prices, as production does."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from proxy.cli import demo_config
from proxy.config import build_config
from proxy.demo import DEFAULT_MODEL_PROFILES
from tests.support.servers import simulator_in_thread, start_thermostat


@pytest.mark.parametrize("model", ["sim-1", "sim-1-mini"])
def test_demo_costs_are_in_dollars_at_the_simulators_prices(tmp_path: Path, model: str) -> None:
    base = build_config({"server": {"data_dir": str(tmp_path)}, "storage": {"flush_interval_s": 0.05},
                         "admin": {"allow_unauthenticated": True}}, environ={})
    with simulator_in_thread(seed=3) as sim:
        running = start_thermostat(demo_config(base, sim.url, mode="general", holdout=0.0, feedback="none"))
        try:
            client = openai.OpenAI(base_url=running.url, api_key="sk-test", max_retries=0, timeout=10)
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "write a sort function"}], max_tokens=300,
                extra_headers={"x-task-type": "code"},
            )
            usage = raw.parse().usage
            assert usage is not None
            running.flush(0.2)
            (row,) = running.call(running.runtime.sink.fetch_decisions(limit=10))
        finally:
            running.stop()
    price = DEFAULT_MODEL_PROFILES[model]
    by_hand = (usage.prompt_tokens * price.input_price_per_mtok + usage.completion_tokens * price.output_price_per_mtok) / 1e6
    assert row.request_id == raw.http_response.headers["x-request-id"]
    assert row.cost_usd == pytest.approx(by_hand, rel=1e-9)
