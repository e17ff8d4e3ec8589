"""Each model's prices, looked up once: the operator's overrides over the `genai-prices` table.

`PriceBook.rates(upstream, model)` answers from a per-model cache, so the request path
pays a dict lookup (bench/pricing_cost.py); the table itself (`proxy.common.price_table.genai_rates`, injected) is
read the first time a model is seen, and again after `refresh_s` only for models whose
table entry changes price over time (dated or time-of-day prices). The cost math is
`policies.pricing` (pure).

Where prices come from, per `[[upstreams]]`:

- `[[upstreams.models_config]]` `input_price_per_mtok`, `output_price_per_mtok`,
  `cached_input_price_per_mtok` (US dollars per million tokens) win over the table, field
  by field: self-hosted and fine-tuned models, negotiated prices.
- The table (`genai-prices`, kept by Pydantic, MIT): the provider named by the upstream's
  `price_provider` (a table provider id such as "openai"), else the provider whose API
  URL matches the upstream's `base_url`. An upstream the table does not know (a
  self-hosted server, a gateway) gets no table price: a model is never priced by a guess
  from its name alone.

A model with neither is unknown: its cost is None (null in the log and the API), the
caller counts it (`thermostat_unknown_price_requests_total`), and it is logged once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from policies.pricing import Price, Rates, TokenUsage, cost_usd
from proxy.common import genai_rates
from proxy.common import load_table as load_table  # bench/pricing_cost.py reads it here

log = logging.getLogger("thermostat.prices")

MAX_CACHED = 8192
"""(upstream, model) pairs kept; model names are capped per upstream before they get here."""


class TableLookup(Protocol):
    def __call__(self, model: str, *, provider_id: str | None, api_url: str | None, at: datetime) -> tuple[Rates, bool] | None:
        """The table's rates for `model` at time `at`, and whether they change over time; None if not listed."""
        ...


class PricedModel(Protocol):
    """What `PriceBook` reads from a `models_config` entry (proxy.config.ModelSettings)."""

    @property
    def input_price_per_mtok(self) -> float | None: ...
    @property
    def output_price_per_mtok(self) -> float | None: ...
    @property
    def cached_input_price_per_mtok(self) -> float | None: ...


class PricedUpstream(Protocol):
    """What `PriceBook` reads from an `[[upstreams]]` entry (proxy.config.UpstreamSettings)."""

    @property
    def name(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def price_provider(self) -> str | None: ...


def _override(rates: Rates | None, ms: PricedModel | None) -> Rates | None:
    """The operator's prices over the table's, field by field; None without an input and an output price."""
    if ms is None:
        return rates
    fields = (ms.input_price_per_mtok, ms.output_price_per_mtok, ms.cached_input_price_per_mtok)
    if all(v is None for v in fields):
        return rates
    price_in = Price(ms.input_price_per_mtok) if ms.input_price_per_mtok is not None else (rates.input if rates else None)
    price_out = Price(ms.output_price_per_mtok) if ms.output_price_per_mtok is not None else (rates.output if rates else None)
    if price_in is None or price_out is None:
        return None
    if ms.cached_input_price_per_mtok is not None:
        cache_read: Price | None = Price(ms.cached_input_price_per_mtok)
    elif rates is not None and ms.input_price_per_mtok is None:
        cache_read = rates.cache_read
    else:
        cache_read = None  # an overridden input price with no cached price: cached input is billed as input
    keeps_table = rates is not None and (ms.input_price_per_mtok is None or ms.output_price_per_mtok is None or ms.cached_input_price_per_mtok is None)
    return Rates(
        input=price_in, output=price_out, cache_read=cache_read,
        cache_write=rates.cache_write if rates is not None and ms.input_price_per_mtok is None else None,
        source="config" + (f"+{rates.source}" if keeps_table and rates is not None else ""),
    )


class PriceBook:
    """Per (upstream, model): the rates, cached; see the module docstring."""

    def __init__(
        self,
        upstreams: Sequence[PricedUpstream],
        model_settings: Callable[[str, str], PricedModel | None],
        *,
        table: TableLookup | None = genai_rates,
        clock: Callable[[], float] = time.time,
        refresh_s: float = 60.0,
    ) -> None:
        self._upstreams = {u.name: u for u in upstreams}
        self._model_settings = model_settings
        self._table = table
        self._clock = clock
        self._refresh_s = refresh_s
        self._cache: dict[tuple[str, str], tuple[Rates | None, float]] = {}  # -> (rates, valid until)
        self._warned: set[tuple[str, str]] = set()

    def rates(self, upstream: str, model: str) -> Rates | None:
        key = (upstream, model)
        hit = self._cache.get(key)
        if hit is not None:
            rates, until = hit
            if until == math.inf or self._clock() < until:
                return rates
        rates, changes = self._lookup(upstream, model)
        if len(self._cache) < MAX_CACHED or key in self._cache:
            self._cache[key] = (rates, self._clock() + self._refresh_s if changes else math.inf)
        return rates

    def _lookup(self, upstream: str, model: str) -> tuple[Rates | None, bool]:
        up = self._upstreams.get(upstream)
        table: tuple[Rates, bool] | None = None
        if up is not None and self._table is not None:
            at = datetime.fromtimestamp(self._clock(), tz=UTC)
            try:
                table = self._table(model, provider_id=up.price_provider, api_url=up.base_url, at=at)
            except Exception:  # noqa: BLE001 - a table that cannot price a model leaves it unknown, never a failed request
                log.exception("price table lookup failed for %s on %s", model, upstream)
        ms = self._model_settings(upstream, model)
        rates = _override(table[0] if table else None, ms)
        return rates, bool(table and table[1])

    def cost(self, upstream: str, model: str, usage: TokenUsage | None) -> float | None:
        """US dollars for `usage` at the model's prices; None without usage or without a price (warned once)."""
        if usage is None:
            return None
        rates = self.rates(upstream, model)
        if rates is None:
            self.warn_unknown(upstream, model)
            return None
        return cost_usd(usage, rates)

    def warn_unknown(self, upstream: str, model: str) -> None:
        key = (upstream, model)
        if key not in self._warned and len(self._warned) < MAX_CACHED:
            self._warned.add(key)
            log.warning(
                "no price for model %r on upstream %r: its cost is reported as unknown (null); set input_price_per_mtok "
                "and output_price_per_mtok in its [[upstreams.models_config]] or price_provider on the upstream", model[:120], upstream,
            )
