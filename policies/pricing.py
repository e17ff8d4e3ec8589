"""What a request costs in US dollars: token usage times a model's prices. Pure math, no table.

The prices come from outside (`proxy/decision/prices.py` looks them up in the maintained
`genai-prices` table, with the operator's overrides from `[[upstreams.models_config]]`) and
arrive here as `Rates`, so this module never reads a file, a clock or the network.

How tokens are billed, as the providers bill them and as `genai-prices` computes it:

    cost = (input − cache_read − cache_write) · input_price
         + cache_read  · cache_read_price   (the input price when the model has none)
         + cache_write · cache_write_price  (the input price when the model has none)
         + output · output_price

all per million tokens. `input` counts every input token, cached ones included (OpenAI's
`prompt_tokens`; Anthropic's `input_tokens` plus its two cache counts); `output` counts
every generated token, reasoning included (reasoning is billed at the output price, so
`reasoning_tokens` is carried for the record only). A price can step up past an input
size (`Price.tiers`, e.g. Gemini's long-context prices): the step is chosen by the
request's whole input, as the table does.
"""

from __future__ import annotations

import math

import msgspec

PER = 1_000_000
"""Prices are US dollars per million tokens."""
MICRO = 1_000_000
"""Micro-dollars per dollar: the integer unit a dollar budget counts in (guards/budget.py)."""


class Price(msgspec.Struct, frozen=True):
    """One price per million tokens, with optional steps: `tiers` = ((start, price), ...) ascending,
    a step applying when the request's input tokens exceed its start."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def at(self, input_tokens: int) -> float:
        price = self.base
        for start, stepped in self.tiers:
            if input_tokens > start:
                price = stepped
        return price


class Rates(msgspec.Struct, frozen=True):
    """A model's prices (US dollars per million tokens) and where they came from."""

    input: Price
    output: Price
    cache_read: Price | None = None  # None: cache reads are billed as input
    cache_write: Price | None = None  # None: cache writes are billed as input
    source: str = ""  # "config", "table:<provider>/<model>" or "config+table:..."


class TokenUsage(msgspec.Struct, frozen=True):
    """One response's usage, normalised across wire formats (see the module docstring)."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0  # part of output_tokens


def flat(input_per_mtok: float, output_per_mtok: float, cached_input_per_mtok: float | None = None, source: str = "config") -> Rates:
    """Rates without steps (what `[[upstreams.models_config]]` prices describe)."""
    return Rates(
        input=Price(float(input_per_mtok)),
        output=Price(float(output_per_mtok)),
        cache_read=None if cached_input_per_mtok is None else Price(float(cached_input_per_mtok)),
        source=source,
    )


def cost_usd(usage: TokenUsage, rates: Rates) -> float:
    """The request's cost in US dollars (formula in the module docstring).

    Counts that contradict each other (more cached than input tokens) are clamped rather
    than priced negative: the upstream's numbers are taken as far as they make sense.
    """
    total_in = max(0, usage.input_tokens)
    cache_read = min(max(0, usage.cache_read_tokens), total_in)
    cache_write = min(max(0, usage.cache_write_tokens), total_in - cache_read)
    plain = total_in - cache_read - cache_write
    p_in = rates.input.at(total_in)
    p_read = rates.cache_read.at(total_in) if rates.cache_read is not None else p_in
    p_write = rates.cache_write.at(total_in) if rates.cache_write is not None else p_in
    p_out = rates.output.at(total_in)
    dollars = plain * p_in + cache_read * p_read + cache_write * p_write + max(0, usage.output_tokens) * p_out
    return dollars / PER


def reservation_usd(prompt_tokens: int, max_tokens: int, rates: Rates) -> float:
    """The most a request can cost before it is sent: its estimated prompt at the input price
    plus its whole output cap at the output price (no cache discount is assumed)."""
    return cost_usd(TokenUsage(input_tokens=max(0, prompt_tokens), output_tokens=max(0, max_tokens)), rates)


def to_micro(dollars: float) -> int:
    """Dollars as whole micro-dollars, rounded up: a budget never under-counts a spend."""
    if not math.isfinite(dollars) or dollars <= 0:
        return 0
    return math.ceil(dollars * MICRO - 1e-6)
