"""Dollar cost of a request: the pure math (policies/pricing.py) against values worked out by hand and
against genai-prices' own `calc_price` for public models; the price book's overrides, cache and unknowns
(proxy/decision/prices.py); the usage each wire format reports (proxy/edge/sse.py and formats/)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from genai_prices import Usage, calc_price

from policies.pricing import Price, Rates, TokenUsage, cost_usd, flat, reservation_usd, to_micro
from proxy.common import summarize_body
from proxy.config import build_config, find_model_settings
from proxy.decision import PriceBook
from proxy.decision.prices import genai_rates
from proxy.edge.formats.anthropic import AnthropicFormat
from proxy.edge.formats.responses import ResponsesFormat

NOW = datetime(2026, 12, 1, tzinfo=UTC)


# ---- the math, by hand ------------------------------------------------------------------------


def test_flat_prices_by_hand() -> None:
    rates = flat(2.5, 10.0, 1.25)
    # 1,000 input of which 200 cached, 100 output:
    # 800 · 2.5 + 200 · 1.25 + 100 · 10 = 2,000 + 250 + 1,000 = 3,250 per million = $0.00325
    assert cost_usd(TokenUsage(input_tokens=1000, output_tokens=100, cache_read_tokens=200), rates) == pytest.approx(0.00325, abs=1e-15)
    # no cached price: cached tokens are billed as input: 1,000 · 2.5 + 100 · 10 = 3,500 per million
    assert cost_usd(TokenUsage(input_tokens=1000, output_tokens=100, cache_read_tokens=200), flat(2.5, 10.0)) == pytest.approx(0.0035, abs=1e-15)
    # reasoning tokens are part of the output count and add nothing on top
    assert cost_usd(TokenUsage(input_tokens=0, output_tokens=100, reasoning_tokens=60), rates) == pytest.approx(0.001, abs=1e-15)


def test_cache_writes_and_steps_by_hand() -> None:
    rates = Rates(input=Price(3.0, ((200_000, 6.0),)), output=Price(15.0, ((200_000, 22.5),)), cache_read=Price(0.3), cache_write=Price(3.75))
    # 10,000 input = 1,000 read + 2,000 written + 7,000 plain; 500 output:
    # 7,000 · 3 + 1,000 · 0.3 + 2,000 · 3.75 + 500 · 15 = 21,000 + 300 + 7,500 + 7,500 = 36,300 per million
    small = TokenUsage(input_tokens=10_000, output_tokens=500, cache_read_tokens=1000, cache_write_tokens=2000)
    assert cost_usd(small, rates) == pytest.approx(0.0363, abs=1e-15)
    # past 200,000 input tokens the stepped prices apply to the whole request: 250,000 · 6 + 1,000 · 22.5 = 1,522,500
    assert cost_usd(TokenUsage(input_tokens=250_000, output_tokens=1000), rates) == pytest.approx(1.5225, abs=1e-12)


def test_contradictory_counts_are_clamped_not_negative() -> None:
    assert cost_usd(TokenUsage(input_tokens=100, output_tokens=0, cache_read_tokens=500), flat(1.0, 1.0, 0.5)) == pytest.approx(100 * 0.5 / 1e6)


def test_reservation_is_prompt_at_input_price_plus_cap_at_output_price() -> None:
    # 1,000 prompt · $2.5 + 500 cap · $10 = 7,500 per million = $0.0075 = 7,500 micro-dollars
    assert reservation_usd(1000, 500, flat(2.5, 10.0, 1.25)) == pytest.approx(0.0075)
    assert to_micro(0.0075) == 7500
    assert to_micro(0.0000001) == 1  # rounded up: a budget never under-counts
    assert to_micro(0.0) == 0


# ---- against the table's own calculation --------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "api_url", "provider", "usage"),
    [
        ("gpt-4o", "https://api.openai.com/v1", "openai", TokenUsage(input_tokens=12_345, output_tokens=678, cache_read_tokens=4_096)),
        ("gpt-4o-mini", "https://api.openai.com/v1", "openai", TokenUsage(input_tokens=1000, output_tokens=2000, reasoning_tokens=500)),
        ("claude-sonnet-4-5", "https://api.anthropic.com", "anthropic",
         TokenUsage(input_tokens=30_000, output_tokens=900, cache_read_tokens=20_000, cache_write_tokens=5_000)),
        ("gemini-2.5-pro", "https://generativelanguage.googleapis.com/v1beta/openai", "google", TokenUsage(input_tokens=250_000, output_tokens=4000)),
    ],
)
def test_cost_equals_the_tables_own_calc_price(model: str, api_url: str, provider: str, usage: TokenUsage) -> None:
    found = genai_rates(model, provider_id=provider, api_url=api_url, at=NOW)
    assert found is not None
    rates, _ = found
    theirs = calc_price(
        Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, cache_read_tokens=usage.cache_read_tokens,
              cache_write_tokens=usage.cache_write_tokens),
        model, provider_id=provider, genai_request_timestamp=NOW,
    ).total_price
    assert cost_usd(usage, rates) == pytest.approx(float(theirs), rel=1e-12)
    assert isinstance(theirs, Decimal) and theirs > 0


def test_table_found_by_the_upstreams_api_url() -> None:
    found = genai_rates("gpt-4o-mini", provider_id=None, api_url="https://api.openai.com/v1", at=NOW)
    assert found is not None and found[0].source == "table:openai/gpt-4o-mini"
    assert genai_rates("gpt-4o-mini", provider_id=None, api_url="http://127.0.0.1:8000/v1", at=NOW) is None  # self-hosted: no guess
    assert genai_rates("no-such-model-xyz", provider_id="openai", api_url=None, at=NOW) is None


# ---- the price book --------------------------------------------------------------------------------


def _book(doc: dict[str, object], table: object = genai_rates, clock: object = None) -> PriceBook:
    cfg = build_config(doc, environ={})
    ups = {u.name: u for u in cfg.upstreams}

    def settings(upstream: str, model: str):  # type: ignore[no-untyped-def]
        return find_model_settings(ups[upstream], model) if upstream in ups else None

    kwargs = {} if clock is None else {"clock": clock}
    return PriceBook(cfg.upstreams, settings, table=table, **kwargs)  # type: ignore[arg-type]


def test_override_wins_over_the_table_field_by_field() -> None:
    book = _book({"upstreams": [{"name": "oa", "base_url": "https://api.openai.com/v1", "models_config": [
        {"pattern": "gpt-4o-mini", "output_price_per_mtok": 1.0},
        {"pattern": "gpt-4o", "input_price_per_mtok": 2.0, "output_price_per_mtok": 8.0},
        {"pattern": "ft:*", "input_price_per_mtok": 3.0, "output_price_per_mtok": 12.0, "cached_input_price_per_mtok": 1.5},
    ]}]})
    usage = TokenUsage(input_tokens=1000, output_tokens=100, cache_read_tokens=400)
    # gpt-4o-mini: table input 0.15, cached 0.075; output overridden to 1.0: 600·0.15 + 400·0.075 + 100·1 = 220 per million
    assert book.cost("oa", "gpt-4o-mini", usage) == pytest.approx(220e-6)
    # gpt-4o: input and output overridden, no cached price given: cached tokens billed as the overridden input
    assert book.cost("oa", "gpt-4o", usage) == pytest.approx((1000 * 2.0 + 100 * 8.0) / 1e6)
    # a fine-tuned model the table does not know, priced by the operator: 600·3 + 400·1.5 + 100·12 = 3,600
    assert book.cost("oa", "ft:gpt-4o:acme", usage) == pytest.approx(3600e-6)
    assert book.rates("oa", "ft:gpt-4o:acme") == flat(3.0, 12.0, 1.5)


def test_unknown_price_is_none_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    book = _book({"upstreams": [{"name": "local", "base_url": "http://127.0.0.1:9/v1", "models_config": [
        {"pattern": "half-*", "input_price_per_mtok": 1.0},  # no output price and no table: still unknown
    ]}]})
    usage = TokenUsage(input_tokens=10, output_tokens=10)
    with caplog.at_level(logging.WARNING, logger="thermostat.prices"):
        assert book.cost("local", "llama-3", usage) is None
        assert book.cost("local", "llama-3", usage) is None
        assert book.cost("local", "half-model", usage) is None
    assert sum("no price for model 'llama-3'" in r.getMessage() for r in caplog.records) == 1
    assert book.cost("local", "llama-3", None) is None  # no usage: nothing to price


def test_price_provider_names_the_tables_provider() -> None:
    book = _book({"upstreams": [{"name": "gw", "base_url": "http://127.0.0.1:9/v1", "price_provider": "openai"}]})
    rates = book.rates("gw", "gpt-4o-mini")
    assert rates is not None and rates.source == "table:openai/gpt-4o-mini"


def test_lookups_are_cached_per_model_and_dated_prices_refreshed() -> None:
    calls: list[str] = []
    now = [1_000.0]

    def table(model: str, *, provider_id: str | None, api_url: str | None, at: datetime) -> tuple[Rates, bool] | None:
        calls.append(model)
        return flat(1.0 if at.timestamp() < 1_100 else 2.0, 1.0), model == "dated"

    book = _book({"upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1"}]}, table=table, clock=lambda: now[0])
    for _ in range(100):
        book.rates("u", "fixed")
        book.rates("u", "dated")
    assert calls == ["fixed", "dated"]
    now[0] = 1_200.0  # past refresh_s: only the model whose price changes over time is read again
    assert book.rates("u", "dated") == flat(2.0, 1.0)
    assert book.rates("u", "fixed") == flat(1.0, 1.0)
    assert calls == ["fixed", "dated", "dated"]


def test_bad_prices_and_providers_are_refused_at_start_up() -> None:
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match="input_price_per_mtok"):
        build_config({"upstreams": [{"name": "u", "base_url": "http://x/v1", "models_config": [{"pattern": "*", "input_price_per_mtok": -1.0}]}]}, environ={})
    with pytest.raises(ConfigError, match="price_provider"):
        build_config({"upstreams": [{"name": "u", "base_url": "http://x/v1", "price_provider": "nobody"}]}, environ={})


# ---- usage as each wire format reports it ----------------------------------------------------------


def test_chat_usage_details() -> None:
    body = {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1200, "completion_tokens": 300, "prompt_tokens_details": {"cached_tokens": 1024},
                      "completion_tokens_details": {"reasoning_tokens": 200}}}
    usage = summarize_body(msgspec.json.encode(body)).usage()
    assert usage == TokenUsage(input_tokens=1200, output_tokens=300, cache_read_tokens=1024, reasoning_tokens=200)
    assert summarize_body(b'{"choices": []}').usage() is None


def test_responses_usage_details() -> None:
    body = {"status": "completed", "output": [], "usage": {"input_tokens": 900, "output_tokens": 50,
            "input_tokens_details": {"cached_tokens": 512}, "output_tokens_details": {"reasoning_tokens": 30}}}
    usage = ResponsesFormat().summarize_body(msgspec.json.encode(body)).usage()
    assert usage == TokenUsage(input_tokens=900, output_tokens=50, cache_read_tokens=512, reasoning_tokens=30)


def test_anthropic_usage_adds_the_cache_counts_to_input() -> None:
    body = {"type": "message", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 100, "output_tokens": 40, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 300}}
    usage = AnthropicFormat().summarize_body(msgspec.json.encode(body)).usage()
    assert usage == TokenUsage(input_tokens=2400, output_tokens=40, cache_read_tokens=2000, cache_write_tokens=300)


def test_anthropic_stream_usage() -> None:
    summarizer = AnthropicFormat().stream_summarizer()
    events = [
        {"type": "message_start", "message": {"type": "message", "usage": {"input_tokens": 10, "output_tokens": 1,
                                                                            "cache_read_input_tokens": 90, "cache_creation_input_tokens": 0}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 25}},
    ]
    for ev in events:
        summarizer.feed(b"event: " + str(ev["type"]).encode() + b"\ndata: " + msgspec.json.encode(ev))
    assert summarizer.summary.usage() == TokenUsage(input_tokens=100, output_tokens=25, cache_read_tokens=90)
