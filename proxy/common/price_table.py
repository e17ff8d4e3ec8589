"""The `genai-prices` table (kept by Pydantic, MIT), read on first use.

Below the decision room because configuration validation also reads it (the provider
ids an `[[upstreams]]` `price_provider` may name); the decision room's `PriceBook`
reads each model's rates from it.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from policies.pricing import Price, Rates


def table_price(value: Any) -> Price | None:
    """A table price (Decimal or genai-prices `TieredPrices`) as a `Price`."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return Price(float(value))
    base = getattr(value, "base", None)
    tiers = getattr(value, "tiers", None)
    if isinstance(base, Decimal) and tiers is not None:
        return Price(float(base), tuple((int(t.start), float(t.price)) for t in tiers))
    return None


def genai_rates(model: str, *, provider_id: str | None, api_url: str | None, at: datetime) -> tuple[Rates, bool] | None:
    """`genai-prices`' entry for `model` (its own provider and model matching), as `Rates`."""
    from genai_prices import data_snapshot
    from genai_prices.types import ModelPrice

    snapshot = data_snapshot.get_snapshot()
    try:
        provider, info = snapshot.find_provider_model(model, None, provider_id, None if provider_id else api_url)
    except LookupError:
        return None
    prices = info.get_prices(at)
    price_in, price_out = table_price(prices.input_mtok), table_price(prices.output_mtok)
    if price_in is None or price_out is None:
        return None
    rates = Rates(
        input=price_in,
        output=price_out,
        cache_read=table_price(prices.cache_read_mtok),
        cache_write=table_price(prices.cache_write_mtok),
        source=f"table:{provider.id}/{info.id}",
    )
    return rates, not isinstance(info.prices, ModelPrice)


def load_table() -> None:
    """Read the bundled table now (~0.6 s, once per process), so no request waits for it."""
    from genai_prices import data_snapshot

    data_snapshot.get_snapshot()


def table_providers() -> tuple[str, ...]:
    """The provider ids the table knows (config validation of `price_provider`)."""
    from genai_prices import data_snapshot

    return tuple(p.id for p in data_snapshot.get_snapshot().providers)
